//! A `greencode serve` child process on a free loopback port: started with
//! `--port 0`, its address read from the startup line on stderr, ready once
//! `/health` answers 200, killed when dropped. `bench serve` and `bench
//! soak` start one when no `--url` is given; the integration tests start
//! theirs the same way.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why the server did not come up; carries what it wrote to stderr.
#[derive(Debug, thiserror::Error)]
#[error("greencode serve {what}; its log: {log:?}")]
pub struct StartError {
    /// What went wrong.
    pub what: String,
    /// Its stderr lines so far.
    pub log: Vec<String>,
}

/// A running `greencode serve`, killed on drop.
pub struct ServerProcess {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Runs `cmd` (a `greencode … serve --port 0 …` command line; stdout is
    /// discarded and stderr captured here) and waits up to `timeout` for it
    /// to print its address and then to answer `/health` with 200.
    pub fn start(mut cmd: Command, timeout: Duration) -> Result<Self, StartError> {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| StartError {
                what: format!("could not be started: {e}"),
                log: Vec::new(),
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("on http://").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let deadline = Instant::now() + timeout;
        let mut server = Self {
            child,
            url: String::new(),
            log,
        };
        match rx.recv_timeout(timeout) {
            Ok(addr) => server.url = format!("http://{addr}"),
            Err(_) => return Err(server.failed("did not print its address")),
        }
        loop {
            let ok = ureq::get(format!("{}/health", server.url))
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200);
            if ok {
                return Ok(server);
            }
            if Instant::now() > deadline || server.child.try_wait().is_ok_and(|s| s.is_some()) {
                return Err(server.failed("never became healthy"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn failed(&self, what: &str) -> StartError {
        StartError {
            what: what.to_owned(),
            log: self.log(),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Lines the server wrote to stderr so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child process (to signal it or wait for it).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
