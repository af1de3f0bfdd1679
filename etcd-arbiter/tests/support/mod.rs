//! A real etcd for the tests: Debian's `etcd-server` (scripts/install-deps.sh), one member
//! on random local ports in a temporary directory, killed when dropped.

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Etcd {
        let e = Self::spawn("http", &[]);
        e.wait_ready().await;
        e
    }

    /// Starts etcd serving clients over TLS (`extra`: its certificate flags) and waits until
    /// its log says it serves.
    pub async fn start_tls(extra: &[String]) -> Etcd {
        let e = Self::spawn("https", extra);
        let log = e.dir.path().join("etcd.log");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("serving client traffic securely")
        {
            assert!(
                Instant::now() < deadline,
                "etcd (TLS) did not start; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        e
    }

    fn spawn(scheme: &str, extra: &[String]) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .arg("--name=t")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=t={peer_url}"))
            .arg("--logger=zap")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting etcd (Debian package etcd-server: run scripts/install-deps.sh)");
        Etcd {
            child: Some(child),
            dir,
            endpoint,
        }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([&self.endpoint], None).await {
                if c.get("/", None).await.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer on {} within 20 s; its log:\n{}",
                self.endpoint,
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A plain client (no auth) for setting things up.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([&self.endpoint], None)
            .await
            .unwrap()
    }

    /// Enables authentication with `root` / `password`.
    pub async fn enable_auth(&self, password: &str) {
        let mut c = self.client().await;
        c.user_add("root", password, None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.auth_enable().await.unwrap();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of etcd members on random local ports, each killable and restartable.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    initial: String,
}

pub struct Member {
    pub name: String,
    pub client: String,
    pub peer: String,
    child: Option<Child>,
}

impl Cluster {
    /// Starts `n` members and waits until the cluster answers.
    pub async fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("http://127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            members,
            initial,
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_ready().await;
        c
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let child = Command::new("etcd")
            .arg(format!("--name={}", m.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join(&m.name).display()
            ))
            .arg(format!("--listen-client-urls={}", m.client))
            .arg(format!("--advertise-client-urls={}", m.client))
            .arg(format!("--listen-peer-urls={}", m.peer))
            .arg(format!("--initial-advertise-peer-urls={}", m.peer))
            .arg(format!("--initial-cluster={}", self.initial))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting etcd (Debian package etcd-server: run scripts/install-deps.sh)");
        self.members[i].child = Some(child);
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// Waits until a write through the running members succeeds.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let eps: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client.clone())
            .collect();
        loop {
            if let Ok(mut c) = etcd_client::Client::connect(&eps, None).await {
                let put = tokio::time::timeout(Duration::from_secs(2), c.put("/ready", "1", None));
                if matches!(put.await, Ok(Ok(_))) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the etcd cluster did not answer within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The index of the current leader.
    pub async fn leader(&self) -> usize {
        let mut c = etcd_client::Client::connect(self.endpoints(), None)
            .await
            .unwrap();
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let mut one = etcd_client::Client::connect([&m.client], None)
                .await
                .unwrap();
            if let Ok(s) = one.status().await {
                if s.leader() == s.header().map_or(0, |h| h.member_id()) {
                    return i;
                }
            }
        }
        let _ = c.status().await;
        panic!("no leader found");
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts member `i` on its data.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
