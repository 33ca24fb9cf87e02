//! The real `kappa` binary as the end-to-end tests start it.
#![allow(dead_code)] // each test binary uses a part

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Starts `kappa serve` on a free port with its data in `dir` and `extra` options, and
    /// waits until it accepts connections. Its log goes to a file in the temporary directory
    /// (a pipe nobody reads could fill and stall it; a file beside `dir` would take space
    /// from it), shown if the server exits before listening.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let log_path = std::env::temp_dir().join(format!("kappa-test-{port}.log"));
        let log = std::fs::File::create(&log_path).expect("server log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_kappa"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kappa");
        let deadline = Instant::now() + Duration::from_secs(120);
        // A connection to a port nobody listens on can succeed by connecting to itself
        // (the port came from the ephemeral range, and so may the probe's own): that is
        // not the server.
        let listening = || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
        };
        while !listening() {
            if let Ok(Some(status)) = child.try_wait() {
                let err = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("kappa exited ({status}) before listening:\n{err}");
            }
            assert!(Instant::now() < deadline, "kappa did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        kappa_sql_tests::connect(([127, 0, 0, 1], self.port).into()).await
    }

    /// The server's peak resident memory so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        self.memory_mib("VmHWM:")
    }

    /// The server's resident memory now (VmRSS), in MiB.
    pub fn rss_mib(&self) -> u64 {
        self.memory_mib("VmRSS:")
    }

    fn memory_mib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb / 1024)
            .unwrap_or_else(|| panic!("{field} in /proc status"))
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
