//! SUBSCRIBE from stock clients, checked against an oracle: random INSERT/UPDATE/DELETE go
//! into a table while psql (`DECLARE … CURSOR FOR SUBSCRIBE`, `FETCH`, over a pipe) and
//! psycopg (the same through the extended protocol) follow two views of it, at parallelism
//! 1 and 2, and a query of its own (`SUBSCRIBE (SELECT …)`). Each follower folds the `kappa_diff` rows it receives; at every progress row the
//! fold must equal the view as it stood after some prefix of the statements (in order,
//! never going back), and after each FLUSH exactly the oracle's view: a Python model of the
//! table, aggregated by hand. `COPY (SUBSCRIBE …) TO STDOUT` is checked the same way.

use std::io::Write;
use std::process::{Command, Stdio};

mod common;
use common::Server;

const SCRIPT: &str = r#"
import random, subprocess, sys, time
from collections import Counter
import psycopg

port = int(sys.argv[1])
dsn = f"host=127.0.0.1 port={port} user=kappa dbname=kappa"
w = psycopg.connect(dsn, autocommit=True)
w.execute("CREATE TABLE t (id BIGINT PRIMARY KEY, k INT, x BIGINT)")
for p in (1, 2):
    w.execute(f"CREATE MATERIALIZED VIEW v{p} WITH (parallelism = {p}) AS "
              "SELECT k, count(*) AS n, sum(x) AS s FROM t GROUP BY k")

rng = random.Random(20261207)
table = {}
next_id = 0

def view_of():
    agg = {}
    for k, x in table.values():
        n, s = agg.get(k, (0, 0))
        agg[k] = (n + 1, s + x)
    return Counter((k, n, s) for k, (n, s) in agg.items())

def insert(n):
    global next_id
    rows = []
    for _ in range(n):
        next_id += 1
        rows.append((next_id, rng.randint(0, 6), rng.randint(-50, 50)))
    w.execute("INSERT INTO t VALUES " + ",".join(f"({i},{k},{x})" for i, k, x in rows))
    for i, k, x in rows:
        table[i] = (k, x)

def random_statement():
    r = rng.random()
    if r < 0.45 or len(table) < 3:
        insert(rng.randint(1, 5))
    elif r < 0.8:
        i = rng.choice(sorted(table))
        k, _ = table[i]
        nk = rng.randint(0, 6) if rng.random() < 0.3 else k
        nx = rng.randint(-50, 50)
        w.execute(f"UPDATE t SET k = {nk}, x = {nx} WHERE id = {i}")
        table[i] = (nk, nx)
    else:
        k = rng.randint(0, 6)
        w.execute(f"DELETE FROM t WHERE k = {k}")
        for i in [i for i, (kk, _) in table.items() if kk == k]:
            del table[i]

def committed_epoch(view):
    return w.execute(f"SELECT epoch FROM kappa_view_stats WHERE name = '{view}'").fetchone()[0]

class Follower:
    """Folds one subscription's rows; checks the fold at every progress row."""
    def __init__(self, name, fetch):
        self.name, self.fetch = name, fetch
        self.fold, self.progress, self.checked = Counter(), -1, 0
        self.snapshot_epoch = None

    def add(self, e, progressed, diff, row):
        if progressed:
            assert e > self.progress, f"{self.name}: progress went from {self.progress} to {e}"
            if self.snapshot_epoch is None:
                self.snapshot_epoch = e
            self.progress = e
            self.on_progress()
        else:
            assert e > self.progress, f"{self.name}: a change of epoch {e} after it was complete"
            self.fold[row] += diff
            assert self.fold[row] >= 0, f"{self.name}: {row} retracted more than inserted"
            if self.fold[row] == 0:
                del self.fold[row]

    def follow(self, epoch, states):
        """Reads until epoch `epoch` is complete; at each progress row the fold must be one
        of `states` (the view after successive statements), in order; at the end the last."""
        self.states, self.at = states, 0
        deadline = time.time() + 60
        while self.progress < epoch:
            assert time.time() < deadline, f"{self.name}: no progress past {self.progress}"
            for r in self.fetch():
                self.add(*r)
        assert self.fold == states[-1], \
            f"{self.name} at epoch {self.progress}: fold {sorted(self.fold.elements())} != view {sorted(states[-1].elements())}"

    def on_progress(self):
        if not hasattr(self, "states"):
            return
        while self.at < len(self.states) and self.fold != self.states[self.at]:
            self.at += 1
        assert self.at < len(self.states), \
            f"{self.name} at epoch {self.progress}: fold {sorted(self.fold.elements())} is no state the view went through"
        self.checked += 1

def parse_psql(line):
    f = line.split("|")
    e, progressed = int(f[0]), f[1] == "t"
    if progressed:
        return e, True, None, None
    return e, False, int(f[2]), (int(f[3]), int(f[4]), int(f[5]))

insert(20)
w.execute("FLUSH")

followers = []
# psycopg: the extended protocol (Parse/Bind/Describe/Execute), a cursor in a transaction.
for p in (1, 2):
    conn = psycopg.connect(dsn)
    cur = conn.cursor()
    cur.execute(f"DECLARE c{p} CURSOR FOR SUBSCRIBE v{p} WITH (PROGRESS)")
    assert cur.description is None, "DECLARE returns no rows"
    def fetch(cur=cur, p=p):
        cur.execute(f"FETCH ALL c{p} WITH (timeout = '2s')")
        assert [d.name for d in cur.description] == \
            ["kappa_epoch", "kappa_progressed", "kappa_diff", "k", "n", "s"], cur.description
        return [(e, prog, d, None if prog else (k, n, s)) for e, prog, d, k, n, s in cur.fetchall()]
    followers.append(Follower(f"psycopg v{p}", fetch))

# A query of its own (not a view): the same rows through a dataflow only it uses.
qconn = psycopg.connect(dsn)
qcur = qconn.cursor()
qcur.execute("DECLARE q CURSOR FOR SUBSCRIBE (SELECT k, count(*) AS n, sum(x) AS s FROM t GROUP BY k) "
             "WITH (PROGRESS)")
def fetch_query():
    qcur.execute("FETCH ALL q WITH (timeout = '2s')")
    return [(e, prog, d, None if prog else (k, n, s)) for e, prog, d, k, n, s in qcur.fetchall()]
followers.append(Follower("psycopg query", fetch_query))

# psql: the simple protocol, over a pipe, one FETCH at a time.
psql = subprocess.Popen(
    ["stdbuf", "-oL", "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "kappa", "-X", "-q",
     "-A", "-t", "-v", "ON_ERROR_STOP=1"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
psql.stdin.write("BEGIN;\nDECLARE c1 CURSOR FOR SUBSCRIBE v1 WITH (PROGRESS);\n"
                 "DECLARE c2 CURSOR FOR SUBSCRIBE v2 WITH (PROGRESS);\n")
for p in (1, 2):
    def fetch(p=p):
        psql.stdin.write(f"FETCH ALL c{p} WITH (timeout = '2s');\n\\echo __end__\n")
        psql.stdin.flush()
        rows = []
        while True:
            line = psql.stdout.readline()
            assert line, "psql ended"
            line = line.rstrip("\n")
            if line == "__end__":
                return rows
            if line:
                rows.append(parse_psql(line))
    followers.append(Follower(f"psql v{p}", fetch))

# COPY (SUBSCRIBE …) TO STDOUT through psql: lines stream as epochs commit.
copy = subprocess.Popen(
    ["stdbuf", "-oL", "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "kappa", "-X", "-q",
     "-c", "COPY (SUBSCRIBE v2 WITH (PROGRESS)) TO STDOUT"],
    stdout=subprocess.PIPE, text=True, bufsize=1)
def fetch_copy():
    line = copy.stdout.readline()
    assert line, "COPY ended"
    f = line.rstrip("\n").split("\t")
    e, progressed = int(f[0]), f[1] == "t"
    if progressed:
        assert f[2:] == ["\\N"] * 4, line
        return [(e, True, None, None)]
    return [(e, False, int(f[2]), (int(f[3]), int(f[4]), int(f[5])))]
followers.append(Follower("COPY v2", fetch_copy))

# The snapshot: the contents at the start, before any statement below.
start = view_of()
epoch = max(committed_epoch("v1"), committed_epoch("v2"))
for f in followers:
    f.follow(epoch, [start])
    assert f.snapshot_epoch is not None

rounds = 25
for _ in range(rounds):
    states = [view_of()]
    for _ in range(rng.randint(1, 3)):
        random_statement()
        states.append(view_of())
    w.execute("FLUSH")
    for p in (1, 2):
        got = Counter(tuple(r) for r in w.execute(f"SELECT k, n, s FROM v{p}").fetchall())
        assert got == states[-1], f"v{p} itself is wrong"
    epoch = max(committed_epoch("v1"), committed_epoch("v2"))
    for f in followers:
        f.follow(epoch, states)

# SNAPSHOT = false: no rows before the first progress row, then only later changes.
conn = psycopg.connect(dsn, autocommit=True)
cur = conn.cursor()
cur.execute("DECLARE late CURSOR FOR SUBSCRIBE v1 WITH (SNAPSHOT = false, PROGRESS)")
first = cur.execute("FETCH 1 late").fetchall()
assert len(first) == 1 and first[0][1], f"the first row is the progress row: {first}"
cur.execute("CLOSE late")

# Errors are clean, with their SQLSTATEs, and the connection stays usable.
for sql, state in [("FETCH 1 nosuch", "34000"), ("SUBSCRIBE nosuch", "42P01"),
                   ("SUBSCRIBE v1 WITH (colour = 1)", "22023"), ("SUBSCRIBE (SELECT 1", "42601")]:
    try:
        cur.execute(sql)
        raise AssertionError(f"{sql} did not fail")
    except psycopg.Error as e:
        assert e.sqlstate == state, (sql, e.sqlstate, str(e))

copy.kill()
psql.stdin.close()
psql.wait(timeout=30)
print("checked", " ".join(f"{f.name}:{f.checked}" for f in followers))
"#;

#[test]
fn subscribers_fold_to_the_view_at_every_epoch() {
    let dir = std::env::temp_dir().join(format!("kappa-subscribe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = Server::start(&dir, &[]);
    let mut child = Command::new("python3")
        .args(["-", &server.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is installed (scripts/setup.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(SCRIPT.as_bytes())
        .expect("write the script");
    let out = child.wait_with_output().expect("python ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the subscription check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every follower checked its fold at many progress rows, not only at the end.
    let counts: Vec<u64> = stdout
        .split_whitespace()
        .filter_map(|w| w.rsplit(':').next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 6, "{stdout}");
    assert!(counts.iter().all(|&c| c >= 25), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
