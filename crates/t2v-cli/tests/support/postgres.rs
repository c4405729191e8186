//! A throwaway PostgreSQL cluster for tests: `initdb` in a temporary folder, the server on
//! 127.0.0.1 and a free port with its socket in that folder, stopped (and the folder removed) on
//! drop. The server binaries come from `T2V_TEST_PG_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package). As root the cluster runs as the
//! `postgres` user: PostgreSQL refuses to run as root.
//!
//! Without binaries a test says `SKIPPED` and why; with `T2V_TEST_POSTGRES=required` or in CI
//! (`CI=true`, t2v-testkit's rule) it fails instead.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<&'static str>,
    pub port: u16,
    /// `postgres://t2v@127.0.0.1:PORT/postgres`, no password (trust on the loopback only).
    pub url: String,
}

/// A cluster, or `None` after printing why the calling test is skipped.
pub fn cluster_or_skip() -> Option<PgCluster> {
    match PgCluster::start() {
        Ok(c) => Some(c),
        Err(reason) if std::env::var("T2V_TEST_POSTGRES").is_ok_and(|v| v == "required") => {
            panic!("T2V_TEST_POSTGRES=required but no PostgreSQL cluster could start: {reason}")
        }
        Err(reason) => {
            t2v_testkit::skip(reason);
            None
        }
    }
}

fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("T2V_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl PgCluster {
    pub fn start() -> Result<PgCluster, String> {
        let bin = find_bin().ok_or(
            "no PostgreSQL server binaries (apt-get install postgresql, or set T2V_TEST_PG_BIN to the folder of initdb and pg_ctl)",
        )?;
        let run_as = if is_root() {
            if !Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success()) {
                return Err("running as root and there is no `postgres` user to run the server as".into());
            }
            Some("postgres")
        } else {
            None
        };
        let dir = tempfile::Builder::new().prefix("t2v-pg-").tempdir().map_err(|e| e.to_string())?;
        if let Some(user) = run_as {
            let status = Command::new("chown").arg(format!("{user}:")).arg(dir.path()).status();
            if !status.is_ok_and(|s| s.success()) {
                return Err(format!("could not hand {} to the {user} user", dir.path().display()));
            }
        }
        let port = free_port();
        let url = format!("postgres://t2v@127.0.0.1:{port}/postgres");
        let cluster = PgCluster { dir, bin, run_as, port, url };
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "t2v",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        cluster.start_server()?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd.args(args).current_dir(self.dir.path()).output().map_err(|e| format!("{tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            ));
        }
        Ok(())
    }

    fn start_server(&self) -> Result<(), String> {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        let (data, log) = (self.data_dir(), self.dir.path().join("server.log"));
        self.run("pg_ctl", &["-D", path(&data), "-l", path(&log), "-w", "-t", "60", "-o", &options, "start"])
    }

    /// Stops the server as a crash would (`immediate`: no checkpoint, recovery from the WAL at the
    /// next start) or cleanly (`fast`).
    pub fn stop(&self, mode: &str) {
        self.run("pg_ctl", &["-D", path(&self.data_dir()), "-m", mode, "-w", "-t", "60", "stop"])
            .unwrap_or_else(|e| panic!("stopping PostgreSQL: {e}"));
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&self) {
        self.start_server().unwrap_or_else(|e| panic!("starting PostgreSQL again: {e}"));
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", path(&self.data_dir()), "-m", "immediate", "-w", "-t", "30", "stop"]);
    }
}
