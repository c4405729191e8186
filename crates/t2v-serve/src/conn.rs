//! The HTTP/1 connection loop (in place of `axum::serve`, which sets no timer): a header-read
//! timeout that also closes idle keep-alive connections (hyper starts it whenever it waits for a
//! request's head), and a cap on open connections so that slow clients cannot use up the
//! process's file descriptors and starve the others (`/health` included).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// How connections are kept in check.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A request's head (and the wait for the next request on a kept-alive connection) must
    /// arrive within this.
    pub header_timeout: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
}

/// The most connections the process's file-descriptor limit leaves room for: `wanted`, less a
/// reserve for the store, the model's files, uploads and logs.
pub fn connection_cap(wanted: usize) -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if !ok || limit.rlim_cur == libc::RLIM_INFINITY {
        return wanted.max(1);
    }
    let room = (limit.rlim_cur as usize).saturating_sub(64) / 2;
    wanted.min(room).max(1)
}

/// Serves `app` on `listener` until `stop` turns true; connections then finish their requests.
pub async fn serve(listener: TcpListener, app: Router, limits: ConnLimits, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        let (socket, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors (EMFILE) and the like: wait for some to close rather
                // than spin.
                eprintln!("t2v serve: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: closed at once (the client sees a reset, not a hang), and said now and then.
            refused += 1;
            if refused.is_power_of_two() {
                eprintln!(
                    "t2v serve: {refused} connection(s) refused so far: {} are open, the most allowed",
                    limits.max_connections
                );
            }
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone().map_request(|req: axum::http::Request<Incoming>| req.map(axum::body::Body::new)),
        );
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(64 << 10);
            let conn = builder.serve_connection(TokioIo::new(socket), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        });
    }
}
