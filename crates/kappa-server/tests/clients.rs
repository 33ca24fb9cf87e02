//! End-to-end: the real `kappa` binary, driven by real clients — psql (simple protocol) and
//! a Python psycopg script (extended protocol with parameters) — through the README session.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::Server;

/// A server on a fresh data directory of its own.
fn start_server() -> Server {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kappa-e2e-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    Server::start(&dir, &[])
}

/// Runs `cmd` with `input` on its stdin; panics with both outputs unless it succeeds.
fn run_with_stdin(mut cmd: Command, input: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the client is installed (scripts/setup.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write input");
    let out = child.wait_with_output().expect("client ran");
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn psql(port: u16, script: &str) -> String {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "kappa",
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-f",
        "-",
    ]);
    run_with_stdin(cmd, script)
}

#[test]
fn psql_walkthrough() {
    let server = start_server();
    let out = psql(
        server.port,
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, customer TEXT, amount DOUBLE, ts TIMESTAMP);
CREATE MATERIALIZED VIEW spend AS
  SELECT customer, count(*) AS n, sum(amount) AS total, max(amount) AS biggest
  FROM orders WHERE amount > 0 GROUP BY customer;
INSERT INTO orders VALUES (1,'ann',10,now()), (2,'bob',5,now()), (3,'ann',7,now());
SELECT * FROM spend ORDER BY customer;
UPDATE orders SET amount = 1 WHERE id = 1;
SELECT * FROM spend ORDER BY customer;
DELETE FROM orders WHERE id = 2;
SELECT * FROM spend ORDER BY customer;
\\copy orders (id, customer, amount) FROM STDIN WITH (FORMAT csv)
10,dan,2.5
11,dan,4
\\.
SELECT * FROM spend ORDER BY customer;
",
    );
    let lines: Vec<&str> = out.lines().filter(|l| l.contains('|')).collect();
    assert_eq!(
        lines,
        vec![
            "ann|2|17|10",
            "bob|1|5|5", // after INSERT
            "ann|2|8|7",
            "bob|1|5|5", // after UPDATE
            "ann|2|8|7", // after DELETE
            "ann|2|8|7",
            "dan|2|6.5|4", // after COPY
        ],
        "full output:\n{out}"
    );
}

#[test]
fn psycopg_extended_protocol() {
    let server = start_server();
    let script = format!(
        r#"
import psycopg
with psycopg.connect("host=127.0.0.1 port={port} user=kappa dbname=kappa", autocommit=True) as conn:
    conn.execute("CREATE TABLE orders (id BIGINT PRIMARY KEY, customer TEXT, amount DOUBLE, ts TIMESTAMP)")
    conn.execute("CREATE MATERIALIZED VIEW spend AS SELECT customer, count(*) AS n, sum(amount) AS total, max(amount) AS biggest FROM orders WHERE amount > 0 GROUP BY customer")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO orders VALUES (%s, %s, %s, now())", [(1, "ann", 10.0), (2, "bob", 5.0), (3, "ann", 7.0)])
        print(cur.execute("SELECT * FROM spend ORDER BY customer").fetchall())
        cur.execute("UPDATE orders SET amount = %s WHERE id = %s", (1.0, 1))
        print(cur.execute("SELECT * FROM spend WHERE customer = %s", ("ann",)).fetchall())
        cur.execute("DELETE FROM orders WHERE id = %s", (2,))
        print(cur.execute("SELECT customer, n FROM spend ORDER BY customer").fetchall())
        try:
            cur.execute("INSERT INTO orders VALUES (%s, %s, %s, now())", (1, "dup", 1.0))
            print("no error")
        except psycopg.errors.UniqueViolation as e:
            print("unique violation", e.sqlstate)
        print(cur.execute("SELECT count(*) FROM orders WHERE customer = %s", ("it's",)).fetchone())
with psycopg.connect("host=127.0.0.1 port={port} user=kappa dbname=kappa") as conn:
    # Not autocommit: psycopg wraps statements in BEGIN/COMMIT.
    conn.execute("INSERT INTO orders VALUES (%s, %s, %s, now())", (9, "eve", 2.0))
    conn.commit()
    print(conn.execute("SELECT n, total FROM spend WHERE customer = 'eve'").fetchone())
"#,
        port = server.port
    );
    let mut python = Command::new("python3");
    python.arg("-");
    let stdout = run_with_stdin(python, &script);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec![
            "[('ann', 2, 17.0, 10.0), ('bob', 1, 5.0, 5.0)]",
            "[('ann', 2, 8.0, 7.0)]",
            "[('ann', 2)]",
            "unique violation 23505",
            "(0,)",
            "(1, 2.0)",
        ]
    );
}

#[test]
fn garbage_on_the_socket_does_not_hurt_other_sessions() {
    let server = start_server();
    for junk in [
        &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        &[0xffu8; 64][..],
        b"\x00\x00\x00\x03",
    ] {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", server.port)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.write_all(junk);
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
        }
    }
    let out = psql(server.port, "SELECT 40 + 2;");
    assert_eq!(out.trim(), "42");
}

#[test]
fn jdbc_driver() {
    let jar = "/usr/share/java/postgresql.jar";
    assert!(
        std::path::Path::new(jar).exists(),
        "the PostgreSQL JDBC driver is required (scripts/setup.sh installs libpostgresql-jdbc-java)"
    );
    let server = start_server();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/KappaJdbc.java");
    let out = Command::new("java")
        .args(["-cp", jar, src, &server.port.to_string()])
        .output()
        .expect("java is installed (scripts/setup.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "JDBC program failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec![
            "inserted 1",
            "inserted 1",
            "inserted 1",
            "ann 2 17.0 10.0",
            "ann 2 17.0 10.0",
            "updated 1",
            "deleted 1",
            "ann 2 8.0 7.0",
            "ts 2024-05-06 07:08:09.5",
            "error 23505",
            "count 2",
        ]
    );
}
