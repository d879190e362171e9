//! lazypull-netem: a small TCP proxy that emulates a slow network on loopback (no `tc netem`
//! here): a shared bandwidth limit per direction, a one-way delay, and optionally corruption of
//! one byte of each large HTTP response body (to test that unverified bytes are never stored).
//!
//! Usage: lazypull-netem --listen 127.0.0.1:0 --upstream 127.0.0.1:5000 [--mbit 100] [--rtt-ms 20]
//!        [--tamper-after 4096] [--hold-after BYTES --hold-until FILE]. Prints `listening on ADDR`
//!        once ready. Test/bench tool only.

use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "TCP proxy emulating bandwidth and latency (and optional body corruption) for tests and benchmarks"
)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address to forward to.
    #[arg(long)]
    upstream: String,
    /// Bandwidth per direction in Mbit/s, shared by all connections (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    mbit: f64,
    /// Round-trip time to add in ms (half on each direction).
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
    /// Flip one byte this many bytes into each HTTP response body (server → client), if it is that long.
    #[arg(long)]
    tamper_after: Option<u64>,
    /// Stop forwarding a connection's server → client bytes once this many have passed on it,
    /// until the file `--hold-until` exists: a test then knows a long download cannot have
    /// finished, however loaded the machine, while short requests on other connections go on.
    #[arg(long, requires = "hold_until")]
    hold_after: Option<u64>,
    /// The file whose creation releases the hold of `--hold-after`.
    #[arg(long, requires = "hold_after")]
    hold_until: Option<std::path::PathBuf>,
}

/// Holds a connection's server → client direction after a byte budget until a file appears.
struct Hold {
    after: u64,
    until: std::path::PathBuf,
}

impl Hold {
    /// Waits for the release file (checked every 20 ms; otherwise the hold ends with the
    /// connection).
    async fn wait(&self) {
        while !self.until.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A token bucket shared by the connections of one direction.
struct Bucket {
    bytes_per_sec: f64,
    next_free: Instant,
}

impl Bucket {
    /// When `n` bytes may leave, reserving the link for them.
    fn reserve(&mut self, n: usize) -> Instant {
        // Timers wake late (tokio rounds up to the millisecond): let the link catch up on up to
        // 10 ms of time lost that way, so the emulated rate is the configured one.
        let now = Instant::now();
        let start = self.next_free.max(now - Duration::from_millis(10));
        self.next_free = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
        self.next_free
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bucket: Option<Arc<Mutex<Bucket>>>,
    delay: Duration,
    tamper_after: Option<u64>,
    hold: Option<Arc<Hold>>,
) {
    // Delay is applied per chunk by timestamping reads and releasing them `delay` later, in order.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    // Tamper state: find the end of headers, then count body bytes.
    let mut header_tail: Vec<u8> = Vec::new();
    let mut body_seen: Option<u64> = None;
    let mut tampered = false;
    let mut passed = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut data = buf[..n].to_vec();
        if let Some(after) = tamper_after
            && !tampered
        {
            let mut i = 0;
            while i < data.len() {
                match body_seen {
                    None => {
                        header_tail.push(data[i]);
                        if header_tail.ends_with(b"\r\n\r\n") {
                            body_seen = Some(0);
                            header_tail.clear();
                        }
                        i += 1;
                    }
                    Some(seen) => {
                        let left = after.saturating_sub(seen);
                        let avail = (data.len() - i) as u64;
                        if avail > left {
                            data[i + left as usize] ^= 0xff;
                            tampered = true;
                            break;
                        }
                        body_seen = Some(seen + avail);
                        i = data.len();
                    }
                }
            }
        }
        // Pace the reader at the link rate (backpressure like a real link), then queue the chunk
        // for delivery after the one-way delay.
        if let Some(b) = &bucket {
            let ready = b.lock().await.reserve(n);
            tokio::time::sleep_until(ready.into()).await;
        }
        if let Some(h) = &hold {
            // Let through what fits in the budget, hold the rest (and everything after it).
            let left = h.after.saturating_sub(passed);
            if left < n as u64 {
                let rest = data.split_off(left as usize);
                if !data.is_empty() && tx.send((Instant::now() + delay, data)).await.is_err() {
                    break;
                }
                h.wait().await;
                data = rest;
            }
            passed += n as u64;
        }
        if tx.send((Instant::now() + delay, data)).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let bucket = |_: ()| {
        (args.mbit > 0.0).then(|| {
            Arc::new(Mutex::new(Bucket {
                bytes_per_sec: args.mbit * 1e6 / 8.0,
                next_free: Instant::now(),
            }))
        })
    };
    let (down, up) = (bucket(()), bucket(()));
    let delay = Duration::from_millis(args.rtt_ms) / 2;
    let hold = match (args.hold_after, args.hold_until.clone()) {
        (Some(after), Some(until)) => Some(Arc::new(Hold { after, until })),
        _ => None,
    };
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = args.upstream.clone();
        let (down, up, tamper) = (down.clone(), up.clone(), args.tamper_after);
        let hold = hold.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let a = tokio::spawn(pump(cr, sw, up, delay, None, None));
            let b = tokio::spawn(pump(sr, cw, down, delay, tamper, hold));
            let _ = tokio::join!(a, b);
        });
    }
}
