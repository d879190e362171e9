//! Keeping the FUSE connection across daemon restarts, so that running containers keep their
//! lazy layers (docs/dev/fuse-restart.md).
//!
//! A FUSE connection lives as long as some process holds its `/dev/fuse` descriptor. After a
//! fresh mount the daemon hands a duplicate of that descriptor to a small **holder** process
//! (`lazypull fuse-holder`, started by the daemon, outliving it). When the daemon stops while the
//! mount is in use (container overlays on its layers), it leaves the mount in place; requests
//! then wait in the kernel. The next daemon asks the holder for the descriptor, resumes the
//! session without a second INIT (patched fuser, vendor/fuser/PATCHED.md), and tells the kernel
//! to resend the requests the old process read but never answered (`FUSE_NOTIFY_RESEND`).
//!
//! The holder talks over a unix socket next to the mountpoint (`<mountpoint>.holder.sock`,
//! 0600, peers must have our uid): one JSON message per request, the descriptor as
//! `SCM_RIGHTS`. It exits when told to (`drop`), when the connection ends, or when the mount it
//! holds is no longer at the mountpoint. Hand-written because the protocol is three messages
//! between two copies of this binary; no crate covers fd passing plus this lifecycle.

use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a client waits for the holder's answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A holder that was started but given nothing to hold within this long exits.
const PUT_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the holder checks that its mount is still in place.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Bound on one message (it is a few hundred bytes of JSON).
const MAX_MESSAGE: usize = 64 << 10;
/// `FUSE_NOTIFY_RESEND` (include/uapi/linux/fuse.h, Linux 6.9).
const FUSE_NOTIFY_RESEND: i32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("{0}: {1}")]
    Sys(&'static str, nix::errno::Errno),
    #[error("fuse holder protocol: {0}")]
    Protocol(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> HandoverError {
    move |e| HandoverError::Io(what, e)
}

/// What the next daemon needs besides the descriptor to continue the session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub mountpoint: PathBuf,
    /// `major:minor` of the mount (mountinfo), to tell it from a later mount at the same path.
    pub dev: String,
    /// FUSE ABI version negotiated at INIT.
    pub proto: (u32, u32),
    /// Whether the kernel agreed to FUSE passthrough at INIT.
    pub passthrough: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Request {
    Put { held: Held },
    Get,
    Drop,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    held: Option<Held>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The files that belong to the mount at `mountpoint`: the holder's socket and the list of
/// layer directories in the order their inode numbers were given out.
#[derive(Clone, Debug)]
pub struct Paths {
    pub socket: PathBuf,
    pub layers: PathBuf,
    /// The passthrough backing ids given out on this connection ([`BackingLog`]).
    pub backing: PathBuf,
}

impl Paths {
    pub fn for_mountpoint(mountpoint: &Path) -> Paths {
        let name = mountpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fs".into());
        let dir = mountpoint.parent().unwrap_or(Path::new("/"));
        Paths {
            socket: dir.join(format!("{name}.holder.sock")),
            layers: dir.join(format!("{name}.layers")),
            backing: dir.join(format!("{name}.backing")),
        }
    }
}

/// Send one framed message (u32 length, then JSON), with `fd` attached if given.
fn send(
    stream: &UnixStream,
    msg: &impl Serialize,
    fd: Option<BorrowedFd>,
) -> Result<(), HandoverError> {
    let json = serde_json::to_vec(msg).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    let mut buf = (json.len() as u32).to_le_bytes().to_vec();
    buf.extend_from_slice(&json);
    let fds;
    let cmsgs: Vec<nix::sys::socket::ControlMessage> = match fd {
        Some(fd) => {
            fds = [fd.as_raw_fd()];
            vec![nix::sys::socket::ControlMessage::ScmRights(&fds)]
        }
        None => vec![],
    };
    let n = nix::sys::socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&buf)],
        &cmsgs,
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| HandoverError::Sys("send to the fuse holder", e))?;
    // The rest, if the socket took only part (the descriptor went with the first byte).
    (&*stream)
        .write_all(&buf[n..])
        .map_err(io("send to the fuse holder"))
}

/// Receive one framed message and the descriptor attached to it, if any.
fn recv<T: for<'de> Deserialize<'de>>(
    stream: &UnixStream,
) -> Result<(T, Option<OwnedFd>), HandoverError> {
    let mut head = [0u8; 4];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut head)];
        let msg = nix::sys::socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| HandoverError::Sys("receive from the fuse holder", e))?;
        let mut fd = None;
        for c in msg
            .cmsgs()
            .map_err(|e| HandoverError::Sys("control message", e))?
        {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel just installed `raw` in this process for us (SCM_RIGHTS);
                    // nothing else owns it. Extra descriptors are wrapped too, and so closed.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        (msg.bytes, fd)
    };
    if n == 0 {
        return Err(HandoverError::Protocol("connection closed".into()));
    }
    (&*stream)
        .read_exact(&mut head[n..])
        .map_err(io("receive from the fuse holder"))?;
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_MESSAGE {
        return Err(HandoverError::Protocol(format!("message of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    (&*stream)
        .read_exact(&mut body)
        .map_err(io("receive from the fuse holder"))?;
    let msg = serde_json::from_slice(&body).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    Ok((msg, fd))
}

fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn call(
    socket: &Path,
    req: &Request,
    fd: Option<BorrowedFd>,
) -> Result<(Reply, Option<OwnedFd>), HandoverError> {
    let s = connect(socket).map_err(io("connect to the fuse holder"))?;
    exchange(&s, req, fd)
}

fn exchange(
    s: &UnixStream,
    req: &Request,
    fd: Option<BorrowedFd>,
) -> Result<(Reply, Option<OwnedFd>), HandoverError> {
    send(s, req, fd)?;
    let (reply, fd): (Reply, _) = recv(s)?;
    if !reply.ok {
        return Err(HandoverError::Protocol(reply.error.unwrap_or_default()));
    }
    Ok((reply, fd))
}

/// The connection a holder at `socket` keeps, if one answers there.
pub fn take(socket: &Path) -> Result<Option<(OwnedFd, Held)>, HandoverError> {
    let s = match connect(socket) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(HandoverError::Io("connect to the fuse holder", e)),
        Ok(s) => s,
    };
    let (reply, fd) = exchange(&s, &Request::Get, None)?;
    match (fd, reply.held) {
        (Some(fd), Some(held)) => Ok(Some((fd, held))),
        _ => Err(HandoverError::Protocol(
            "the holder answered without a descriptor".into(),
        )),
    }
}

/// Tell the holder at `socket`, if any, to close its descriptor and exit.
pub fn release(socket: &Path) {
    if let Err(e) = call(socket, &Request::Drop, None)
        && socket.exists()
    {
        tracing::debug!(socket = %socket.display(), error = %e, "no fuse holder to release");
    }
}

/// Start a holder at `socket` for the connection `fd` and hand it over. The holder is its own
/// process group, so a Ctrl-C meant for the daemon does not end it; it logs to our stderr.
pub fn spawn_holder(socket: &Path, fd: BorrowedFd, held: &Held) -> Result<(), HandoverError> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(io("locate the lazypull binary"))?;
    let _ = std::fs::remove_file(socket);
    let mut child = std::process::Command::new(exe)
        .args(["--log-level", "info"])
        .args(crate::telemetry::child_args())
        .arg("fuse-holder")
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(io("start the fuse holder"))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match call(socket, &Request::Put { held: held.clone() }, Some(fd)) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(HandoverError::Protocol(format!(
                        "the fuse holder exited: {st}"
                    )));
                }
                tracing::trace!(error = %e, "waiting for the fuse holder");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
    }
    // The holder outlives us; reap it if it ends first so it leaves no zombie.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// Ask the kernel to queue again the requests read but not answered by a previous process.
pub fn resend(fd: BorrowedFd) -> Result<(), HandoverError> {
    // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique (0) }
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&16u32.to_ne_bytes());
    h.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    h.extend_from_slice(&0u64.to_ne_bytes());
    nix::unistd::write(fd, &h)
        .map(|_| ())
        .map_err(|e| HandoverError::Sys("FUSE_NOTIFY_RESEND", e))
}

/// False once the kernel has ended the connection (unmounted and released, or aborted).
pub fn connection_alive(fd: BorrowedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut p = [PollFd::new(fd, PollFlags::empty())];
    match poll(&mut p, PollTimeout::ZERO) {
        Ok(_) => !p[0]
            .revents()
            .unwrap_or(PollFlags::empty())
            .intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL),
        Err(_) => false,
    }
}

/// `major:minor` of the lazypull FUSE mount at `path`, from mountinfo. A path shows the last
/// mount stacked on it.
pub fn mount_dev(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_dev_in(&info, path)
}

fn mount_dev_in(mountinfo: &str, path: &Path) -> Option<String> {
    let want = path.to_string_lossy().replace(' ', "\\040");
    mountinfo.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split(' ');
        let (fstype, source) = (r.next()?, r.next()?);
        let mut f = left.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        (mp == want && fstype.starts_with("fuse") && source == "lazypull").then(|| dev.to_string())
    })
}

/// How many overlay mounts in this namespace take lower layers from under `mountpoint`
/// (`lazypull mount` makes them; containerd's go through the snapshotter's paths).
pub fn overlays_over(mountpoint: &Path) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    overlays_over_in(&info, mountpoint)
}

fn overlays_over_in(mountinfo: &str, mountpoint: &Path) -> usize {
    let prefix = format!("{}/", mountpoint.to_string_lossy().replace(' ', "\\040"));
    mountinfo
        .lines()
        .filter_map(|l| l.split_once(" - ").map(|(_, r)| r))
        .filter(|r| r.starts_with("overlay "))
        .filter(|r| {
            r.split(',').any(|o| {
                o.strip_prefix("lowerdir=")
                    .is_some_and(|v| v.contains(&prefix))
            })
        })
        .count()
}

/// The holder: keep `fd` until told to drop it, until the connection ends, or until its mount
/// is gone from the mountpoint. Blocking; this is all the `fuse-holder` process does.
pub fn run_holder(socket: &Path) -> Result<(), HandoverError> {
    hold(socket, |h| {
        mount_dev(&h.mountpoint).as_deref() == Some(h.dev.as_str())
    })
}

fn hold(socket: &Path, still_mounted: impl Fn(&Held) -> bool) -> Result<(), HandoverError> {
    let listener = UnixListener::bind(socket).map_err(io("bind the fuse holder socket"))?;
    let cleanup = RemoveOnDrop(socket.to_path_buf());
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io("chmod the fuse holder socket"))?;
    listener
        .set_nonblocking(true)
        .map_err(io("fuse holder socket"))?;
    let me = nix::unistd::geteuid();
    let started = Instant::now();
    let mut held: Option<(OwnedFd, Held)> = None;
    let mut last_check = Instant::now();
    loop {
        {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            if let Some((fd, _)) = &held {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::empty()));
            }
            let _ = poll(&mut fds, PollTimeout::from(CHECK_EVERY.as_millis() as u16));
        }
        match &held {
            None if started.elapsed() > PUT_TIMEOUT => {
                return Err(HandoverError::Protocol(
                    "nothing to hold was handed over".into(),
                ));
            }
            Some((fd, h)) => {
                if !connection_alive(fd.as_fd()) {
                    tracing::info!(mountpoint = %h.mountpoint.display(), "fuse holder: the connection ended; exiting");
                    break;
                }
                if last_check.elapsed() >= CHECK_EVERY {
                    last_check = Instant::now();
                    if !still_mounted(h) {
                        tracing::info!(mountpoint = %h.mountpoint.display(), "fuse holder: the mount is gone; exiting");
                        break;
                    }
                }
            }
            None => {}
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(HandoverError::Io("accept", e)),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
        if peer.map(|c| c.uid()) != Ok(me.as_raw()) {
            tracing::warn!("fuse holder: refused a peer of another user");
            continue;
        }
        let (req, fd): (Request, _) = match recv(&stream) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "fuse holder: bad request");
                continue;
            }
        };
        let mut ok = Reply {
            ok: true,
            held: None,
            error: None,
        };
        let mut give = None;
        let mut exit = false;
        match (req, fd) {
            (Request::Put { held: h }, Some(fd)) => {
                tracing::info!(mountpoint = %h.mountpoint.display(), dev = %h.dev, "fuse holder: holding the connection");
                held = Some((fd, h));
            }
            (Request::Put { .. }, None) => {
                ok = Reply {
                    ok: false,
                    held: None,
                    error: Some("put without a descriptor".into()),
                };
            }
            (Request::Get, _) => match &held {
                Some((fd, h)) => {
                    ok.held = Some(h.clone());
                    give = Some(fd.as_fd());
                }
                None => {
                    ok = Reply {
                        ok: false,
                        held: None,
                        error: Some("holding nothing".into()),
                    }
                }
            },
            (Request::Drop, _) => exit = true,
        }
        if let Err(e) = send(&stream, &ok, give) {
            tracing::warn!(error = %e, "fuse holder: reply failed");
        }
        if exit {
            tracing::info!("fuse holder: released; exiting");
            break;
        }
    }
    drop(cleanup);
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The layer directories in inode order, one digest hex per line, as persisted in
/// [`Paths::layers`]. Lines that are not a digest's hex make the whole list unusable.
/// The passthrough backing ids a FUSE connection has open, per inode, kept across daemons.
///
/// The kernel ties an inode opened by passthrough to its backing file until the last such open
/// is closed, and fails any open of it with another backing file, or without one, with EIO.
/// Backing ids belong to the connection, not to the process, so after a restart the inodes a
/// container still holds (the binary its shell runs from) must be opened with the id the
/// previous daemon registered. Each daemon appends a record when it registers an id and
/// before it closes one; the next reads the ids still open. A record is 16 bytes: inode (u64
/// LE), id (u32 LE), 1 open / 0 closed (u32 LE). Written without fsync: the log matters only
/// while the connection lives, and a machine crash ends both.
pub struct BackingLog {
    file: std::fs::File,
}

const BACKING_RECORD: usize = 16;

fn backing_record(ino: u64, id: u32, open: bool) -> [u8; BACKING_RECORD] {
    let mut r = [0u8; BACKING_RECORD];
    r[..8].copy_from_slice(&ino.to_le_bytes());
    r[8..12].copy_from_slice(&id.to_le_bytes());
    r[12..].copy_from_slice(&u32::from(open).to_le_bytes());
    r
}

/// The ids still open after replaying `log` (a torn last record is ignored).
pub fn parse_backing_log(log: &[u8]) -> std::collections::BTreeMap<u64, u32> {
    let mut open = std::collections::BTreeMap::new();
    for r in log.chunks_exact(BACKING_RECORD) {
        let ino = u64::from_le_bytes(r[..8].try_into().unwrap_or_default());
        let id = u32::from_le_bytes(r[8..12].try_into().unwrap_or_default());
        match u32::from_le_bytes(r[12..].try_into().unwrap_or_default()) {
            1 => {
                open.insert(ino, id);
            }
            _ => {
                if open.get(&ino) == Some(&id) {
                    open.remove(&ino);
                }
            }
        }
    }
    open
}

impl BackingLog {
    /// A fresh connection: no ids yet.
    pub fn create(path: &Path) -> std::io::Result<BackingLog> {
        Ok(BackingLog {
            file: std::fs::File::create(path)?,
        })
    }

    /// A resumed connection: the ids the previous daemons left open, and the log rewritten to
    /// just those (so it does not grow across restarts).
    pub fn resume(
        path: &Path,
    ) -> std::io::Result<(BackingLog, std::collections::BTreeMap<u64, u32>)> {
        let open = match std::fs::read(path) {
            Ok(b) => parse_backing_log(&b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(e),
        };
        let tmp = path.with_extension("backing.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        for (&ino, &id) in &open {
            f.write_all(&backing_record(ino, id, true))?;
        }
        std::fs::rename(&tmp, path)?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok((BackingLog { file }, open))
    }

    pub fn opened(&mut self, ino: u64, id: u32) -> std::io::Result<()> {
        self.file.write_all(&backing_record(ino, id, true))
    }

    pub fn closing(&mut self, ino: u64, id: u32) -> std::io::Result<()> {
        self.file.write_all(&backing_record(ino, id, false))
    }
}

pub fn parse_layer_list(text: &str) -> Option<Vec<String>> {
    text.lines()
        .map(|l| {
            (l.len() == 64
                && l.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| l.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_log_replays_to_the_ids_still_open() {
        let mut log = vec![];
        log.extend(backing_record(7, 1, true));
        log.extend(backing_record(9, 2, true));
        log.extend(backing_record(7, 1, false));
        log.extend(backing_record(7, 3, true));
        // A stale close of an id the inode no longer has changes nothing.
        log.extend(backing_record(9, 5, false));
        log.extend(&[1, 2, 3]); // torn record
        let open = parse_backing_log(&log);
        assert_eq!(open.into_iter().collect::<Vec<_>>(), [(7, 3), (9, 2)]);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fs.backing");
        let (_, none) = BackingLog::resume(&p).unwrap();
        assert!(none.is_empty(), "no log: nothing open");
        let mut l = BackingLog::create(&p).unwrap();
        l.opened(1 << 32 | 5, 4).unwrap();
        l.opened(2 << 32 | 6, 8).unwrap();
        l.closing(1 << 32 | 5, 4).unwrap();
        drop(l);
        let (mut l, open) = BackingLog::resume(&p).unwrap();
        assert_eq!(open.into_iter().collect::<Vec<_>>(), [(2 << 32 | 6, 8)]);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 16, "compacted");
        l.opened(3, 9).unwrap();
        drop(l);
        assert_eq!(BackingLog::resume(&p).unwrap().1.len(), 2);
    }

    #[test]
    fn mount_dev_finds_the_last_lazypull_mount_at_a_path() {
        let info = "\
36 25 0:31 / /run/lazypull/fs rw,nosuid - fuse lazypull rw,user_id=0
40 25 0:35 / /run/lazypull/fs2 rw - fuse lazypull rw
41 36 0:44 / /run/lazypull/fs rw - fuse lazypull rw
42 25 0:45 / /run/other rw - fuse sshfs rw
43 25 0:46 / /a\\040b rw - fuse.lazypull lazypull rw
";
        assert_eq!(
            mount_dev_in(info, Path::new("/run/lazypull/fs")).as_deref(),
            Some("0:44")
        );
        assert_eq!(mount_dev_in(info, Path::new("/run/other")), None);
        assert_eq!(
            mount_dev_in(info, Path::new("/a b")).as_deref(),
            Some("0:46")
        );
        assert_eq!(mount_dev_in(info, Path::new("/nowhere")), None);
    }

    #[test]
    fn overlays_over_the_mountpoint_are_counted() {
        let info = "\
50 25 0:50 / /tmp/root rw - overlay overlay rw,lowerdir=/run/lazypull/fs/aa:/run/lazypull/fs/bb,upperdir=/u,workdir=/w
51 25 0:51 / /tmp/other rw - overlay overlay rw,lowerdir=/var/lib/x:/var/lib/y
52 25 0:52 / /tmp/fs2 rw - overlay overlay rw,lowerdir=/run/lazypull/fs2/aa
53 25 0:31 / /run/lazypull/fs rw - fuse lazypull rw
";
        assert_eq!(overlays_over_in(info, Path::new("/run/lazypull/fs")), 1);
        assert_eq!(overlays_over_in(info, Path::new("/elsewhere")), 0);
    }

    #[test]
    fn layer_list_is_all_or_nothing() {
        let a = "a".repeat(64);
        let b = "0123456789abcdef".repeat(4);
        assert_eq!(
            parse_layer_list(&format!("{a}\n{b}\n")),
            Some(vec![a.clone(), b.clone()])
        );
        assert_eq!(parse_layer_list(""), Some(vec![]));
        assert_eq!(parse_layer_list(&format!("{a}\nnot-hex\n")), None);
        assert_eq!(parse_layer_list(&"A".repeat(64)), None);
    }

    #[test]
    fn paths_sit_next_to_the_mountpoint() {
        let p = Paths::for_mountpoint(Path::new("/run/lazypull/fs"));
        assert_eq!(p.socket, Path::new("/run/lazypull/fs.holder.sock"));
        assert_eq!(p.layers, Path::new("/run/lazypull/fs.layers"));
    }

    /// The holder's loop in a thread, given a pipe's read end instead of /dev/fuse: returns
    /// the thread, the socket, the held note and the pipe's write end.
    fn holder_with_a_pipe(
        dir: &Path,
    ) -> (
        std::thread::JoinHandle<Result<(), HandoverError>>,
        PathBuf,
        Held,
        OwnedFd,
    ) {
        let sock = dir.join("h.sock");
        let s2 = sock.clone();
        let holder = std::thread::spawn(move || hold(&s2, |_| true));
        let (r, w) = nix::unistd::pipe().unwrap();
        let held = Held {
            mountpoint: "/x".into(),
            dev: "0:1".into(),
            proto: (7, 41),
            passthrough: true,
        };
        let put = Request::Put { held: held.clone() };
        let t = Instant::now();
        while call(&sock, &put, Some(r.as_fd())).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "holder never answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // A put without a descriptor is refused; the held one stays.
        assert!(call(&sock, &put, None).is_err());
        (holder, sock, held, w)
    }

    #[test]
    fn a_holder_keeps_and_gives_back_a_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let (holder, sock, held, w) = holder_with_a_pipe(dir.path());
        for _ in 0..2 {
            let (got, back) = take(&sock).unwrap().unwrap();
            assert_eq!(back, held);
            nix::unistd::write(&w, b"same pipe").unwrap();
            let mut buf = [0u8; 9];
            nix::unistd::read(&got, &mut buf).unwrap();
            assert_eq!(&buf, b"same pipe");
        }
        let mode = std::fs::metadata(&sock).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        release(&sock);
        holder.join().unwrap().unwrap();
        assert!(!sock.exists(), "the holder removes its socket");
        assert!(take(&sock).unwrap().is_none(), "nobody holds anything now");
    }

    #[test]
    fn a_holder_exits_when_its_connection_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (holder, sock, _, w) = holder_with_a_pipe(dir.path());
        // The pipe's other end closing is what an ended FUSE connection looks like to poll.
        drop(w);
        holder.join().unwrap().unwrap();
        assert!(!sock.exists());
    }
}
