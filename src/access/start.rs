//! Files a start reads before its own work, known without a learned list: what the container
//! runtime reads of every image, and what an interpreter reads of its own installation before
//! the first line of its program. Each is otherwise a miss of its own, one after another, at
//! the very start (through the bench's bottleneck: 25-35 ms each).

/// Read of every container's root filesystem whatever the command: by runc before the
/// process starts (its user and groups are looked up there, `libcontainer/user`), then by the
/// dynamic loader of the first dynamically linked program (its library cache).
pub const CONTAINER_START: &[&str] = &["etc/passwd", "etc/group", "etc/ld.so.cache"];

/// The files CPython 3.`minor` reads when it starts, before its program's first import
/// (measured with strace on Debian's python3.11: the same set for `-c 'print(1)'` and for a
/// script), for the executable at `exe` (`<prefix>/bin/python3.N`). None when `exe` is not
/// one. Paths are relative to the layer root, not checked against it:
/// - the C library's locale and charset data: CPython coerces the C locale to C.UTF-8
///   (PEP 538), which reads `locale.alias`, C.UTF-8's `LC_CTYPE` (named `C.utf8` on Debian,
///   `C.UTF-8` on older distributions) and the gconv modules cache;
/// - `/etc/localtime`, read by the time zone set-up of its `time` module;
/// - the `encodings` package and its UTF-8 codec, imported before anything else;
/// - `sitecustomize` (Debian's, or any), imported by `site`;
/// - before 3.11, `site` and what it imports, which 3.11 and later run from frozen copies.
pub fn python_start(exe: &str) -> Option<Vec<String>> {
    let (bin, name) = exe.rsplit_once('/')?;
    let minor: u32 = name.strip_prefix("python3.")?.parse().ok()?;
    let prefix = bin
        .strip_suffix("/bin")
        .or_else(|| (bin == "bin").then_some(""))?;
    let stdlib = if prefix.is_empty() {
        format!("lib/python3.{minor}")
    } else {
        format!("{prefix}/lib/python3.{minor}")
    };
    let tag = format!("cpython-3{minor}");
    let mut out: Vec<String> = [
        "usr/share/locale/locale.alias",
        "usr/lib/locale/C.utf8/LC_CTYPE",
        "usr/lib/locale/C.UTF-8/LC_CTYPE",
        "etc/localtime",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for dir in super::elf::LIBRARY_DIRS {
        out.push(format!("{dir}/gconv/gconv-modules.cache"));
    }
    let mut modules = vec!["encodings/__init__", "encodings/aliases", "encodings/utf_8"];
    if minor < 11 {
        modules.extend([
            "codecs",
            "io",
            "abc",
            "site",
            "os",
            "stat",
            "_collections_abc",
            "posixpath",
            "genericpath",
            "_sitebuiltins",
        ]);
    }
    modules.push("sitecustomize");
    for m in modules {
        let (dir, file) = match m.rsplit_once('/') {
            Some((d, f)) => (format!("{stdlib}/{d}"), f),
            None => (stdlib.clone(), m),
        };
        // The compiled module, and its source for an image without `__pycache__` (the
        // official python images delete them): whichever the image has.
        out.push(format!("{dir}/__pycache__/{file}.{tag}.pyc"));
        out.push(format!("{dir}/{file}.py"));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_start_files_follow_the_interpreters_prefix_and_version() {
        let debian = python_start("usr/bin/python3.11").unwrap();
        for want in [
            "usr/lib/locale/C.utf8/LC_CTYPE",
            "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
            "etc/localtime",
            "usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
            "usr/lib/python3.11/encodings/__pycache__/utf_8.cpython-311.pyc",
            "usr/lib/python3.11/__pycache__/sitecustomize.cpython-311.pyc",
        ] {
            assert!(debian.iter().any(|p| p == want), "{want}");
        }
        // Frozen from 3.11 on: not read.
        assert!(!debian.iter().any(|p| p.contains("/site.")));
        let official = python_start("usr/local/bin/python3.9").unwrap();
        assert!(
            official
                .iter()
                .any(|p| p == "usr/local/lib/python3.9/encodings/__init__.py")
        );
        assert!(
            official
                .iter()
                .any(|p| p == "usr/local/lib/python3.9/__pycache__/site.cpython-39.pyc")
        );
        for not in [
            "usr/bin/python3",
            "usr/bin/python3.11-config",
            "usr/bin/dash",
            "python3.11",
        ] {
            assert_eq!(python_start(not), None, "{not}");
        }
    }
}
