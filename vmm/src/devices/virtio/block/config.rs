//! The `--disk` option's value: `path=FILE[,readonly][,private]`.

use std::path::PathBuf;
use std::str::FromStr;

use xxhash_rust::xxh3::xxh3_64;

use super::device::ID_BYTES;

/// A block device's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Refuse writes (the device offers VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Never write FILE: it is opened read-only, and the guest's writes
    /// stay in a private level in memory (see
    /// [`super::SpecDisk::new_private`]). Restored VMs and boot-cache VMs
    /// always run their disks this way.
    pub private: bool,
}

/// Why a `--block` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockConfigError {
    /// No `path=`.
    #[error("missing `path=FILE` in `{0}` (expected `path=FILE[,readonly][,private]`)")]
    MissingPath(String),
    /// `path=` with nothing after it.
    #[error("empty path in `{0}`")]
    EmptyPath(String),
    /// A key given twice.
    #[error("`{key}` given twice in `{value}`")]
    Duplicate {
        /// The key.
        key: String,
        /// The whole value.
        value: String,
    },
    /// An unknown key or a flag with a value.
    #[error("unknown option `{item}` in `{value}` (expected `path=FILE[,readonly][,private]`)")]
    Unknown {
        /// The item.
        item: String,
        /// The whole value.
        value: String,
    },
}

impl FromStr for BlockConfig {
    type Err = BlockConfigError;

    /// Parses `path=FILE[,readonly][,private]`, in any order. A path cannot hold a
    /// comma.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path: Option<PathBuf> = None;
        let mut read_only = false;
        let mut private = false;
        let dup = |key: &str| BlockConfigError::Duplicate {
            key: key.into(),
            value: s.into(),
        };
        for item in s.split(',') {
            if let Some(p) = item.strip_prefix("path=") {
                if p.is_empty() {
                    return Err(BlockConfigError::EmptyPath(s.into()));
                }
                if path.replace(PathBuf::from(p)).is_some() {
                    return Err(dup("path"));
                }
            } else if item == "readonly" {
                if read_only {
                    return Err(dup("readonly"));
                }
                read_only = true;
            } else if item == "private" {
                if private {
                    return Err(dup("private"));
                }
                private = true;
            } else {
                return Err(BlockConfigError::Unknown {
                    item: item.into(),
                    value: s.into(),
                });
            }
        }
        let path = path.ok_or_else(|| BlockConfigError::MissingPath(s.into()))?;
        Ok(Self {
            path,
            read_only,
            private,
        })
    }
}

impl BlockConfig {
    /// The serial number GET_ID reports: `spvm` and 16 hex digits of a
    /// hash of the path as given, exactly [`ID_BYTES`] bytes.
    pub fn default_id(&self) -> [u8; ID_BYTES] {
        let h = xxh3_64(self.path.as_os_str().as_encoded_bytes());
        let s = format!("spvm{h:016x}");
        let mut id = [0u8; ID_BYTES];
        id.copy_from_slice(s.as_bytes());
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_path_and_readonly() {
        let c: BlockConfig = "path=/tmp/a.img".parse().unwrap();
        assert_eq!((c.path.to_str(), c.read_only), (Some("/tmp/a.img"), false));
        let c: BlockConfig = "readonly,path=b.img".parse().unwrap();
        assert_eq!((c.path.to_str(), c.read_only), (Some("b.img"), true));
        assert_eq!(c.default_id().len(), ID_BYTES);
        assert!(c.default_id().starts_with(b"spvm"));
        let c: BlockConfig = "path=c.img,private".parse().unwrap();
        assert!(c.private && !c.read_only);
        let c: BlockConfig = "path=c.img".parse().unwrap();
        assert!(!c.private);
    }

    #[test]
    fn refuses_bad_values_with_the_reason() {
        let cases = [
            ("readonly", "missing `path=FILE`"),
            ("", "unknown option ``"),
            ("path=", "empty path"),
            ("path=a,path=b", "`path` given twice"),
            ("path=a,readonly,readonly", "`readonly` given twice"),
            ("path=a,readonly=yes", "unknown option `readonly=yes`"),
            ("path=a,private,private", "`private` given twice"),
            ("file=a", "unknown option `file=a`"),
        ];
        for (v, want) in cases {
            let e = v.parse::<BlockConfig>().unwrap_err().to_string();
            assert!(e.contains(want), "{v:?}: {e}");
        }
    }
}
