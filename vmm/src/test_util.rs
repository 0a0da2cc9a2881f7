//! Helpers shared by the unit tests.

use std::path::{Path, PathBuf};

/// A private temporary folder for one test, `<tmp>/specvm-<name>-<pid>`,
/// empty at the start and removed on drop, also when the test fails.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Makes the folder (emptying what an earlier run left there).
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("specvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a temp dir");
        Self(d)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the folder.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
