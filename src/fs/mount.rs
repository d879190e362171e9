//! The FUSE mount's lifecycle: mounting, resuming a mount a previous daemon left to a holder
//! process (module `handover`), and stopping (unmounted, or left for the next daemon while
//! running containers use it). The callbacks are in `fuse.rs`.

use super::fuse::LayerFs;
use super::handover::{self, Paths};
use std::sync::Arc;

/// A mounted layer filesystem; unmounts on `unmount_within` (or drop), unless running
/// containers use it and a holder keeps it for the next daemon (module `handover`).
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: std::path::PathBuf,
    /// Set when a holder process keeps the connection for the next daemon.
    handover: Option<Paths>,
    handover_broken: Arc<std::sync::atomic::AtomicBool>,
    /// Whether this process resumed a mount (its fuser session did not mount it).
    pub resumed: bool,
}

/// Why a mount a holder keeps cannot be resumed, if it cannot.
fn unresumable(
    held: &handover::Held,
    fd: &std::os::fd::OwnedFd,
    mountpoint: &std::path::Path,
) -> Option<String> {
    use std::os::fd::AsFd;
    if held.mountpoint != mountpoint {
        return Some(format!("it is mounted at {}", held.mountpoint.display()));
    }
    if !handover::connection_alive(fd.as_fd()) {
        return Some("its connection has ended".into());
    }
    if handover::mount_dev(mountpoint).as_deref() != Some(held.dev.as_str()) {
        return Some("it is no longer at the mountpoint".into());
    }
    None
}

impl Mount {
    /// Mount at `mountpoint` (created if missing), or with `handover`, resume the mount a
    /// previous daemon left to a holder process: running containers then keep their layers.
    /// Our own mounts left there by a crashed daemon without a holder are detached first: a
    /// stat cannot tell them dead, the kernel may answer from its cache. The caller holds the
    /// store lock, so no live daemon of this store uses the mountpoint.
    pub fn start(
        mut fs: LayerFs,
        mountpoint: &std::path::Path,
        threads: usize,
        handover: bool,
    ) -> std::io::Result<Mount> {
        let paths = Paths::for_mountpoint(mountpoint);
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::RO,
            fuser::MountOption::FSName("lazypull".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
        ];
        cfg.acl = fuser::SessionACL::All;
        cfg.n_threads = Some(threads);
        // Cloned descriptors die with this process, and the kernel fails the requests read on
        // them (ECONNABORTED). On the one shared descriptor the holder keeps, requests in flight
        // at a restart stay queued and are sent again to the next daemon.
        cfg.clone_fd = !handover;
        let broken = Arc::clone(&fs.table.handover_broken);
        if handover {
            match handover::take(&paths.socket) {
                Ok(Some((fd, held))) => {
                    let layers = std::fs::read_to_string(&paths.layers)
                        .ok()
                        .and_then(|t| handover::parse_layer_list(&t));
                    let why = unresumable(&held, &fd, mountpoint).or_else(|| {
                        layers.is_none().then(|| {
                            format!("its layer list {} is unreadable", paths.layers.display())
                        })
                    });
                    match (why, layers) {
                        (None, Some(names)) => {
                            return Self::resume(fs, fd, held, names, &paths, cfg, broken);
                        }
                        (why, _) => {
                            tracing::warn!(mountpoint = %mountpoint.display(), reason = why.unwrap_or_default(),
                                "cannot resume the layer filesystem a previous run left; mounting afresh (containers still on the old one lose their lazy layers)");
                            handover::release(&paths.socket);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(socket = %paths.socket.display(), error = %e, "the fuse holder did not answer; mounting afresh");
                    handover::release(&paths.socket);
                }
            }
        }
        for _ in 0..16 {
            if handover::mount_dev(mountpoint).is_none() {
                break;
            }
            tracing::warn!(mountpoint = %mountpoint.display(), "detaching a layer filesystem left by a previous run");
            if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
                return Err(std::io::Error::other(format!(
                    "cannot detach the stale mount at {}: {e}",
                    mountpoint.display()
                )));
            }
        }
        std::fs::create_dir_all(mountpoint)?;
        let list = if handover {
            match std::fs::File::create(&paths.layers) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(path = %paths.layers.display(), error = %e,
                        "cannot write the layer list; running containers will not survive a restart");
                    None
                }
            }
        } else {
            None
        };
        let handover = list.is_some();
        if let Some(f) = list {
            fs.table.persist(f);
            match handover::BackingLog::create(&paths.backing) {
                Ok(log) => fs.persist_backing(log),
                Err(e) => {
                    // Without it, a restart could not reopen files a container holds by
                    // passthrough: serve cached files by read instead.
                    tracing::warn!(path = %paths.backing.display(), error = %e,
                        "cannot write the backing id log; FUSE passthrough off");
                    fs.passthrough_wanted = false;
                }
            }
        }
        let passthrough = fs.passthrough_flag();
        let session = fuser::Session::new(fs, mountpoint, &cfg)?;
        let mut held_by = None;
        if handover {
            use std::os::fd::AsFd;
            let held = handover::mount_dev(mountpoint).map(|dev| handover::Held {
                mountpoint: mountpoint.to_path_buf(),
                dev,
                proto: session.proto_version().unwrap_or((7, 31)),
                passthrough: passthrough.load(std::sync::atomic::Ordering::Relaxed),
            });
            let spawned = match held {
                Some(h) => handover::spawn_holder(&paths.socket, session.as_fd(), &h),
                None => Err(handover::HandoverError::Protocol(
                    "the new mount is not in mountinfo".into(),
                )),
            };
            match spawned {
                Ok(()) => {
                    tracing::info!(socket = %paths.socket.display(), "a fuse holder keeps the connection: running containers survive restarts");
                    held_by = Some(paths);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the fuse holder; running containers will not survive a restart")
                }
            }
        }
        Ok(Mount {
            session: Some(session.spawn()?),
            mountpoint: mountpoint.to_path_buf(),
            handover: held_by,
            handover_broken: broken,
            resumed: false,
        })
    }

    fn resume(
        fs: LayerFs,
        fd: std::os::fd::OwnedFd,
        held: handover::Held,
        names: Vec<String>,
        paths: &Paths,
        cfg: fuser::Config,
        broken: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<Mount> {
        use std::os::fd::AsFd;
        let list = std::fs::OpenOptions::new()
            .append(true)
            .open(&paths.layers)?;
        let backing = match handover::BackingLog::resume(&paths.backing) {
            Ok(b) => {
                if !b.1.is_empty() {
                    tracing::info!(
                        inodes = b.1.len(),
                        "files open by passthrough under the previous run keep their backing files"
                    );
                }
                Some(b)
            }
            Err(e) => {
                tracing::warn!(path = %paths.backing.display(), error = %e,
                    "cannot read the backing id log; FUSE passthrough off for this run");
                None
            }
        };
        let n = names.len();
        fs.adopt(names, list, held.passthrough, backing);
        let acl = cfg.acl;
        let session = fuser::Session::from_fd_initialized(fs, fd, acl, cfg, held.proto);
        match handover::resend(session.as_fd()) {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e,
                "the kernel cannot resend requests a previous run read but did not answer (Linux < 6.9); those reads may hang"),
        }
        tracing::info!(mountpoint = %held.mountpoint.display(), layers = n, passthrough = held.passthrough,
            "resumed the layer filesystem a previous run left: running containers keep their lazy layers");
        Ok(Mount {
            session: Some(session.spawn()?),
            mountpoint: held.mountpoint,
            handover: Some(paths.clone()),
            handover_broken: broken,
            resumed: true,
        })
    }

    /// Stop serving. Without running containers on it, the filesystem is unmounted (and the
    /// holder, if any, released). With running containers and a holder, it stays mounted for
    /// the next daemon: their reads wait until it resumes. With running containers and no
    /// holder, they are served for at most `grace`; when this process exits the kernel aborts
    /// the connection and they get ENOTCONN (README, "Restarts").
    ///
    /// `users` counts what the caller knows stands on the mount (containers' snapshots on lazy
    /// layers). It matters because a busy umount is no sign of them: overlayfs holds private
    /// clones of its lower mounts, so our mount unmounts fine under running containers, and only
    /// the connection stays alive for them. Overlays in our namespace over the mountpoint
    /// (`lazypull mount`) are counted here.
    pub fn unmount_within(mut self, grace: std::time::Duration, users: usize) {
        self.stop(grace, users);
    }

    fn stop(&mut self, grace: std::time::Duration, users: usize) {
        let Some(session) = self.session.take() else {
            return;
        };
        if let Some(paths) = self.handover.take() {
            let broken = self
                .handover_broken
                .load(std::sync::atomic::Ordering::Relaxed);
            let users = users + handover::overlays_over(&self.mountpoint);
            let unmounted = match (broken, users) {
                (true, _) => Err("its layer list could not be recorded".to_string()),
                (false, 0) => {
                    match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
                        Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(true),
                        Err(nix::errno::Errno::EBUSY) => Ok(false),
                        Err(e) => Err(e.to_string()),
                    }
                }
                (false, _) => Ok(false),
            };
            match unmounted {
                Ok(false) => {
                    tracing::info!(mountpoint = %self.mountpoint.display(), holder = %paths.socket.display(), users,
                        "the layer filesystem is in use (running containers on lazy layers): left mounted for the next start, \
                         which resumes it; their reads wait until then");
                    // Keep the session's threads and descriptors as they are until the process
                    // exits: dropping it would try to unmount.
                    std::mem::forget(session);
                    return;
                }
                Ok(true) => {
                    handover::release(&paths.socket);
                    let _ = std::fs::remove_file(&paths.layers);
                    let _ = std::fs::remove_file(&paths.backing);
                    // The session ends when the kernel ends the connection, at once unless
                    // something we could not see still uses it.
                    match within(grace, move || session.join()) {
                        Some(_) => {
                            tracing::info!(mountpoint = %self.mountpoint.display(), "layer filesystem unmounted")
                        }
                        None => {
                            tracing::warn!(mountpoint = %self.mountpoint.display(), grace = ?grace,
                            "unmounted, but something still uses the layer filesystem; it loses it when this process exits")
                        }
                    }
                    return;
                }
                Err(why) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), reason = why,
                        "cannot leave the layer filesystem to the next start");
                    handover::release(&paths.socket);
                    let _ = std::fs::remove_file(&paths.layers);
                    let _ = std::fs::remove_file(&paths.backing);
                }
            }
        }
        match within(grace, move || session.umount_and_join()) {
            Some(Ok(())) => {
                tracing::info!(mountpoint = %self.mountpoint.display(), "layer filesystem unmounted")
            }
            Some(Err(e)) => {
                // EINVAL: already unmounted from outside. EBUSY: still in use: detach it, the
                // kernel finishes once the last user goes.
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount; detaching");
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
            None => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), grace = ?grace,
                    "the layer filesystem is still in use (running containers on lazy layers): \
                     detached; they lose it when this process exits");
            }
        }
    }
}

/// Run `f` on a thread and wait at most `grace` for its result (None past it; the thread is
/// left to finish on its own).
fn within<T: Send + 'static>(
    grace: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(grace).ok()
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(10), 0);
    }
}
