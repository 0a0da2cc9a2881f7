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

/// A KVM VM with `mem`'s regions as memory slots (dirty logging on), for
/// tests that need KVM's dirty log. Where `/dev/kvm` cannot be opened, the
/// test is skipped, never silently passed: this prints
/// `SKIPPED: <test>: <reason>` to stderr, appends the same line (without
/// the prefix) to `<target>/test-skips.txt` as the integration tests do,
/// and returns `None`, on which the test returns. Any other KVM failure
/// (an open `/dev/kvm` that cannot make a VM) fails the test.
pub fn kvm_vm_or_skip(
    test: &str,
    mem: &crate::vstate::memory::GuestMemoryMmap,
) -> Option<crate::vstate::vm::Vm> {
    let kvm = match crate::vstate::vm::open_kvm() {
        Ok(k) => k,
        Err(reason) => {
            record_skip(test, &reason.to_string());
            return None;
        }
    };
    Some(crate::vstate::vm::Vm::new(&kvm, mem, None).expect("creating a KVM VM"))
}

/// `/dev/kvm` opened, or `None` with the skip recorded as
/// [`kvm_vm_or_skip`] does.
pub fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    match crate::vstate::vm::open_kvm() {
        Ok(k) => Some(k),
        Err(reason) => {
            record_skip(test, &reason.to_string());
            None
        }
    }
}

/// `/dev/kvm`, a VM with an in-kernel irqchip, and its vCPU 0 with the
/// CPUID KVM supports: for tests of vCPU state ioctls. `None` with the
/// skip recorded as [`kvm_vm_or_skip`] does.
pub fn kvm_vcpu_or_skip(
    test: &str,
) -> Option<(kvm_ioctls::Kvm, kvm_ioctls::VmFd, kvm_ioctls::VcpuFd)> {
    let kvm = kvm_or_skip(test)?;
    let vm = kvm.create_vm().expect("creating a VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let vcpu = vm.create_vcpu(0).expect("creating a vCPU");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    Some((kvm, vm, vcpu))
}

/// Reports a skipped test on stderr and in `<target>/test-skips.txt`
/// (`<target>` found from the test binary, `<target>/<profile>/deps/...`).
fn record_skip(test: &str, reason: &str) {
    use std::io::Write;
    eprintln!("SKIPPED: {test}: {reason}");
    let exe = std::env::current_exe().ok();
    let Some(target) = exe.as_deref().and_then(|e| e.ancestors().nth(3)) else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(target.join("test-skips.txt"))
        .and_then(|mut f| f.write_all(format!("{test}: {reason}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {}: {e}", target.display());
    }
}
