//! The cache key ([`CacheKey`]): what makes a saved guest valid for a
//! start, its digest and differences, and the file hashes it is built from.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use super::inputs::Hasher;
use super::{io_err, BootCacheError, CHUNK};
use crate::config::{BootSource, VmConfig};
use crate::snapshot::files;

/// What makes a saved ready guest valid for a start: named fields, compared
/// one by one so a miss can say what differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// Field name → value.
    pub fields: BTreeMap<String, String>,
}

impl CacheKey {
    /// The key of `config`'s boot, with the host-compat layer `compat_active`.
    pub fn for_config(
        config: &VmConfig,
        compat_active: bool,
        hasher: &mut Hasher,
    ) -> Result<Self, BootCacheError> {
        let mut f = BTreeMap::new();
        let mut put = |k: &str, v: String| f.insert(k.to_string(), v);
        match &config.boot {
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                put("guest", "linux".into());
                put("kernel", hasher.hash(kernel)?);
                put(
                    "initrd",
                    match initrd {
                        Some(i) => hasher.hash(i)?,
                        None => "none".into(),
                    },
                );
                put(
                    "cmdline",
                    effective_cmdline(cmdline.as_deref(), compat_active),
                );
            }
            BootSource::Bare { program, arg } => {
                put("guest", "bare".into());
                put("program", hasher.hash(program)?);
                put("guest_arg", arg.to_string());
            }
            BootSource::Restore { .. } => {
                return Err(BootCacheError::Unsupported(
                    "--boot-cache caches a boot; it cannot be combined with --restore",
                ))
            }
        }
        put("memory", config.mem_size.to_string());
        put("cpus", config.vcpus.to_string());
        put(
            "host_compat",
            if compat_active { "active" } else { "inactive" }.into(),
        );
        put(
            "snapshot_format",
            crate::snapshot::codec::FORMAT_VERSION.to_string(),
        );
        let nets: Vec<String> = config
            .nets
            .iter()
            .map(|n| {
                let mac = n.mac.map_or("default".to_string(), |m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                });
                format!("mac={mac},mtu={}", n.mtu)
            })
            .collect();
        put("nets", format!("{}[{}]", nets.len(), nets.join(";")));
        // Each disk's whole content (the VM runs it private, so the boot
        // leaves it as hashed here) and whether it is read-only; not its
        // path. The restore also checks the image's identity.
        let disks = config
            .disks
            .iter()
            .map(|d| {
                let ro = if d.read_only { ",readonly" } else { "" };
                Ok(format!("{}{ro}", hasher.hash(&d.path)?))
            })
            .collect::<Result<Vec<_>, BootCacheError>>()?;
        if !disks.is_empty() {
            put("disks", format!("{}[{}]", disks.len(), disks.join(";")));
        }
        Ok(Self { fields: f })
    }

    /// The entry's folder name: 32 hex digits of XXH3-128 over the fields.
    pub fn digest(&self) -> String {
        let mut h = Xxh3::new();
        for (k, v) in &self.fields {
            // Lengths first, so no two field lists hash the same bytes.
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(v.as_bytes());
        }
        format!("{:032x}", h.digest128())
    }

    /// The fields whose values differ from `other`'s, by name, with a word
    /// on how.
    pub fn differences(&self, other: &CacheKey) -> Vec<String> {
        let mut names: Vec<&String> = self.fields.keys().chain(other.fields.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|n| self.fields.get(*n) != other.fields.get(*n))
            .map(|n| describe_difference(n, other.fields.get(n), self.fields.get(n)))
            .collect()
    }
}

/// How field `name` differs: `entry` in the cache, `now` for this start.
fn describe_difference(name: &str, entry: Option<&String>, now: Option<&String>) -> String {
    let show = |v: Option<&String>| v.map_or("(none)".to_string(), |v| v.clone());
    match name {
        "kernel" | "initrd" | "program" => format!("{name} (its content changed)"),
        "disks" => "disks (an image's content, their number or a readonly flag changed)".into(),
        "cmdline" => format!(
            "command line ({:?} now, {:?} saved)",
            show(now),
            show(entry)
        ),
        _ => format!("{name} ({} now, {} saved)", show(now), show(entry)),
    }
}

/// The command line a Linux guest gets (as `linux::cmdline` builds it).
fn effective_cmdline(cmdline: Option<&str>, compat_active: bool) -> String {
    let base = cmdline.unwrap_or(crate::linux::DEFAULT_CMDLINE);
    match compat_active {
        true => crate::host_compat::HostCompat::new().linux_cmdline(base),
        false => base.to_string(),
    }
}

/// XXH3-128 of a whole file, as 32 hex digits.
pub(super) fn hash_file(path: &Path) -> Result<String, BootCacheError> {
    let f = File::open(path).map_err(io_err("reading", path))?;
    let len = f.metadata().map_err(io_err("reading", path))?.len();
    let mut h = Xxh3::new();
    hash_range(&f, 0, len, &mut h).map_err(io_err("reading", path))?;
    Ok(format!("{:032x}", h.digest128()))
}

/// Feeds bytes `[start, start + n)` of `f` to `h`.
fn hash_range(f: &File, start: u64, n: u64, h: &mut Xxh3) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(n as usize).max(1)];
    let mut p = start;
    while p < start + n {
        let k = ((start + n - p) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..k], p)?;
        h.update(&buf[..k]);
        p += k as u64;
    }
    Ok(())
}

/// XXH3-128 of a (sparse) snapshot file: its size, then each data run's
/// offset, length and bytes. Holes are never read, so the cost follows the
/// memory the guest touched, not its size. Two files with the same content
/// but holes in other places hash differently, which only costs a miss.
pub(super) fn hash_sparse(path: &Path) -> Result<(u64, String), BootCacheError> {
    let f = File::open(path).map_err(io_err("reading", path))?;
    let len = f.metadata().map_err(io_err("reading", path))?.len();
    let mut h = Xxh3::new();
    h.update(&len.to_le_bytes());
    for (start, n) in files::data_runs(&f, len).map_err(io_err("reading", path))? {
        h.update(&start.to_le_bytes());
        h.update(&n.to_le_bytes());
        hash_range(&f, start, n, &mut h).map_err(io_err("reading", path))?;
    }
    Ok((len, format!("{:032x}", h.digest128())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot_cache::store::is_entry_name;
    use crate::boot_cache::test_support::{key, tmp};

    #[test]
    fn digests_separate_fields_and_values() {
        let a = key(&[("ab", "c")]);
        let b = key(&[("a", "bc")]);
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), key(&[("ab", "c")]).digest());
        assert!(is_entry_name(&a.digest()));
        assert!(!is_entry_name(".staging-x"));
    }

    #[test]
    fn differences_name_the_fields() {
        let saved = key(&[("initrd", "1"), ("memory", "512"), ("cpus", "2")]);
        let now = key(&[("initrd", "2"), ("memory", "256"), ("cpus", "2")]);
        let d = now.differences(&saved);
        assert_eq!(
            d,
            vec![
                "initrd (its content changed)".to_string(),
                "memory (256 now, 512 saved)".to_string()
            ]
        );
    }

    /// A sparse file hashes by its data runs: the same bytes give the same
    /// hash, one changed byte another one.
    #[test]
    fn sparse_hash_sees_a_changed_byte() {
        let d = tmp("sparse");
        let p = d.join("m");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"hello", 5 << 20).unwrap();
        let (len, a) = hash_sparse(&p).unwrap();
        assert_eq!(len, 64 << 20);
        assert_eq!(hash_sparse(&p).unwrap().1, a);
        f.write_all_at(b"j", 5 << 20).unwrap();
        let (_, b) = hash_sparse(&p).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        assert_ne!(a, b);
    }
}
