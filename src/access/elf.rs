//! What an ELF executable or library loads next: its interpreter and the libraries it needs.
//! When the first chunk of an ELF file is read, the dynamic loader is about to open these one
//! after another (each a round trip to the registry when cold); the reader fetches them
//! beside it instead (`Reader::read`).
//!
//! The names come from the bytes at hand, the file's first chunk: the ELF and program headers
//! (parsed by goblin), the `PT_INTERP` path, and the library names in the first read-only
//! `PT_LOAD` segment. That segment holds `.dynstr` (linkers place it there, before the code),
//! whose library-shaped strings are the `DT_NEEDED` entries, the file's own soname and the
//! files of its symbol versions: all libraries the loader opens or has open. `.dynamic`
//! itself, which would name the needed entries exactly, lies in the data segment, usually
//! beyond the first chunk of a big executable.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::Elf;
use goblin::elf::header;
use goblin::elf::program_header::{PF_X, PT_INTERP, PT_LOAD, ProgramHeader};

/// At most this many libraries per file (a loader list is rarely longer than twenty).
const MAX_LIBS: usize = 64;
/// Longest name taken.
const MAX_NAME: usize = 255;
/// Bytes of the first segment scanned (a `.dynstr` is rarely over 200 KiB).
const MAX_SCAN: usize = 1 << 20;

/// An ELF file's interpreter (an absolute path) and the library names it needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Deps {
    pub interp: Option<String>,
    pub libs: Vec<String>,
}

/// The dependencies of the ELF file whose first bytes are `bytes`, or `None` when it is not an
/// ELF file (or its headers lie beyond `bytes`).
pub fn deps(bytes: &[u8]) -> Option<Deps> {
    deps_of(bytes).map(|(d, _)| d)
}

/// [`deps`], only when `bytes` hold all that it looks at (the interpreter's path and the
/// scanned segment): a prefix of the file still arriving gives all or nothing.
pub fn deps_complete(bytes: &[u8]) -> Option<Deps> {
    deps_of(bytes).and_then(|(d, complete)| complete.then_some(d))
}

fn deps_of(bytes: &[u8]) -> Option<(Deps, bool)> {
    if bytes.len() < header::SIZEOF_IDENT || &bytes[..header::SELFMAG] != header::ELFMAG {
        return None;
    }
    let h = Elf::parse_header(bytes).ok()?;
    let container = if h.e_ident[header::EI_CLASS] == header::ELFCLASS64 {
        Container::Big
    } else {
        Container::Little
    };
    let endian = Endian::from(h.e_ident[header::EI_DATA] == header::ELFDATA2LSB);
    let ctx = Ctx::new(container, endian);
    let phnum = usize::from(h.e_phnum).min(256);
    let phdrs = ProgramHeader::parse(bytes, usize::try_from(h.e_phoff).ok()?, phnum, ctx).ok()?;
    let complete = std::cell::Cell::new(true);
    let slice = |off: u64, len: u64| -> Option<&[u8]> {
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        if end > bytes.len() {
            complete.set(false);
        }
        bytes.get(start..end.min(bytes.len()))
    };
    let interp = phdrs
        .iter()
        .find(|p| p.p_type == PT_INTERP)
        .and_then(|p| slice(p.p_offset, p.p_filesz.min(4096)))
        .and_then(|b| std::str::from_utf8(b.split(|&c| c == 0).next()?).ok())
        .filter(|s| s.starts_with('/') && s.len() <= 4096)
        .map(str::to_string);
    let mut libs: Vec<String> = vec![];
    if let Some(seg) = phdrs
        .iter()
        .find(|p| p.p_type == PT_LOAD)
        .filter(|p| p.p_flags & PF_X == 0)
        .and_then(|p| slice(p.p_offset, p.p_filesz.min(MAX_SCAN as u64)))
    {
        for s in seg.split(|&c| c == 0) {
            if libs.len() >= MAX_LIBS {
                break;
            }
            if let Ok(name) = std::str::from_utf8(s)
                && is_library_name(name)
                && !libs.iter().any(|l| l == name)
            {
                libs.push(name.to_string());
            }
        }
    }
    Some((Deps { interp, libs }, complete.get()))
}

/// `libX.so`, `libX.so.N[.M...]` or `ld-*.so*`: a file name, of the characters sonames use.
fn is_library_name(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_NAME {
        return false;
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
    {
        return false;
    }
    if !(s.starts_with("lib") || s.starts_with("ld-")) {
        return false;
    }
    let Some(at) = s.rfind(".so") else {
        return false;
    };
    // What follows `.so` is nothing or version numbers (`.6`, `.1.2.13`).
    let rest = &s[at + 3..];
    at > 3
        && rest
            .split('.')
            .skip(1)
            .all(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        && (rest.is_empty() || rest.starts_with('.'))
}

/// Where a dynamic loader looks for a library by name, relative to the image's root: the
/// multiarch directories of Debian and Ubuntu, then `lib64`, then the plain ones (Alpine,
/// Fedora, merged /usr). Without `/etc/ld.so.cache` or a run path this is the usual order.
pub const LIBRARY_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
    "usr/local/lib",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_names() {
        for ok in [
            "libc.so.6",
            "libz.so.1",
            "libexpat.so.1.8.10",
            "ld-linux-x86-64.so.2",
            "libstdc++.so.6",
            "libfoo.so",
        ] {
            assert!(is_library_name(ok), "{ok}");
        }
        for bad in [
            "GLIBC_2.2.5",
            "libc.so.6x",
            "lib.so",
            "libc.so.",
            "libc.sox",
            "printf",
            "libc/so.6",
            "../libc.so.6",
            "",
        ] {
            assert!(!is_library_name(bad), "{bad}");
        }
    }

    #[test]
    fn this_test_binary_needs_libc() {
        // The test binary itself is a dynamically linked ELF file of this machine.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let d = deps(&exe[..exe.len().min(4 << 20)]).expect("an ELF file");
        assert!(
            d.interp.as_deref().is_some_and(|i| i.contains("ld-")),
            "{d:?}"
        );
        assert!(d.libs.iter().any(|l| l.starts_with("libc.so")), "{d:?}");
    }

    #[test]
    fn a_prefix_gives_all_the_names_or_none() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let whole = deps(&exe[..exe.len().min(4 << 20)]).expect("an ELF file");
        // Enough for the first segment: the same names as from the whole file.
        let enough = (1..=exe.len().min(4 << 20))
            .step_by(4096)
            .find(|&n| deps_complete(&exe[..n]).is_some())
            .expect("some prefix is enough");
        assert_eq!(deps_complete(&exe[..enough]).unwrap(), whole);
        // Less: nothing, although the headers parse.
        assert!(deps(&exe[..enough - 4096]).is_some());
        assert_eq!(deps_complete(&exe[..enough - 4096]), None);
    }

    #[test]
    fn not_elf_or_truncated_headers() {
        assert_eq!(deps(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(deps(b"\x7fELF"), None);
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Headers only, no segments: no names, and no panic on any prefix.
        for n in [16, 64, 65, 100, 500, 4096] {
            let _ = deps(&exe[..n]);
        }
    }
}
