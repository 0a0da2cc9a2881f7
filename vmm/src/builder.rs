//! Puts a VM together from its configuration, and runs it to its end.
//!
//! Two entry points share the platform: [`build_for_boot`] loads a guest
//! (a bare program or a Linux kernel), [`build_from_snapshot`] reads a
//! snapshot once and restores it. Both make the same VM, memory, devices
//! and vCPUs ([`Platform`]), and hand the controller its parts in one
//! value when the VM runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::x86_64::cpuid::set_vcpu_identity;
use crate::bare::{self, BareError};
use crate::config::{BootSource, VmConfig};
use crate::controller::{Controller, ControllerParts, LiveMachine, NetSpec, VcpuHandle, VcpuSet};
use crate::device_manager::{DeviceError, DeviceManager, VirtioSlot};
use crate::devices::legacy::serial::SerialError;
use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::net::{new_net, new_net_with_backend, NetBackendSpec, NetHandle};
use crate::devices::BusError;
use crate::event::{self, EventReceiver, EventSender, VmEvent};
use crate::host_compat::{self, cpuid, HostCompat, HostCompatError};
use crate::linux::{self, LinuxError, LinuxSpec};
use crate::persist::Persist;
use crate::progress::{self, Progress, ProgressError};
use crate::snapshot::verify::MemoryChecked;
use crate::snapshot::{files, VmSnapshot};
use crate::spec::link::{BridgeLink, OutputCommitHook, SharedDeps, SpecHook};
use crate::spec::memory::{MemoryTracker, Strategy};
use crate::vstate::dirty::{DirtyRings, KvmDirtyLog};
use crate::vstate::memory::{create_guest_memory, GuestRam, MemoryError};
use crate::vstate::vcpu::{
    enable_exit_on_emulation_failure, SyncRegs, Vcpu, VcpuContext, VcpuLink,
};
use crate::vstate::vcpu_state::StateCaps;
use crate::vstate::vm::{open_kvm, Vm, VmError};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM or the VM could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The bare guest could not be loaded.
    #[error(transparent)]
    Bare(#[from] BareError),
    /// The serial console could not be set up.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A device could not be placed on a bus.
    #[error("placing a device on the bus: {0}")]
    Bus(#[from] BusError),
    /// A device could not be placed or restored.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A vCPU could not be created or configured.
    #[error("vCPU {0}: {1}: {2}")]
    Vcpu(u8, &'static str, kvm_ioctls::Error),
    /// The control API could not start.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// The Linux boot could not be prepared.
    #[error(transparent)]
    Linux(#[from] LinuxError),
    /// The host-compat layer could not be set up.
    #[error(transparent)]
    Compat(#[from] HostCompatError),
    /// The progress monitor could not be started.
    #[error(transparent)]
    Progress(#[from] ProgressError),
    /// A network device could not be set up.
    #[error("network device: {0}")]
    Net(String),
    /// A disk could not be set up.
    #[error("--disk: {0}")]
    Disk(String),
    /// A thread could not be started.
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    /// A snapshot could not be restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The guest ran into an error the VMM cannot continue from.
    #[error("{0}")]
    Guest(String),
}

pub use crate::controller::Outcome;

/// A built VM, ready to run.
pub struct Vmm {
    // Field order is drop order: vCPUs and the VM go before guest memory.
    vcpus: Vec<Vcpu>,
    ctx: VcpuContext,
    events: EventReceiver,
    vm: Vm,
    memory: MemoryTracker,
    devices: DeviceManager,
    net: NetSpec,
    api: Option<crate::api::ApiServer>,
    snapshots: crate::controller::SnapshotSetup,
    config: VmConfig,
    _ram: GuestRam,
}

/// What both entry points build: KVM, the VM and its memory, the devices
/// every VM has and the `--net` cards, and the vCPUs (not yet running).
struct Platform {
    vm: Vm,
    ram: GuestRam,
    compat: Option<HostCompat>,
    devices: DeviceManager,
    net: NetSpec,
    vcpus: Vec<Vcpu>,
    /// KVM's dirty tracking for the memory tracker, and the vCPUs' dirty
    /// rings when the VM tracks dirty pages with them.
    dirty_log: KvmDirtyLog,
    rings: Option<Arc<DirtyRings>>,
    events: (EventSender, EventReceiver),
    progress: Arc<Progress>,
    /// Whether a restored VM's memory is known good (open for a boot).
    checked: Arc<MemoryChecked>,
}

/// Builds a VM from `config`: from a snapshot with `--restore`, else by
/// loading its guest.
pub fn build(config: &VmConfig) -> Result<Vmm, VmmError> {
    match &config.boot {
        BootSource::Restore { dir, state } => build_from_snapshot(config, dir, state.take()),
        _ => build_for_boot(config),
    }
}

/// Whether the host-compat layer is active, with the reason logged.
fn host_compat(config: &VmConfig) -> Option<HostCompat> {
    let detection = host_compat::detect(config.host_compat);
    tracing::info!(
        active = detection.active,
        "host compat: {}",
        detection.reason
    );
    detection.active.then(HostCompat::new)
}

/// Builds a VM that boots its guest: a bare program, or a Linux kernel
/// with its platform devices and ACPI tables.
pub fn build_for_boot(config: &VmConfig) -> Result<Vmm, VmmError> {
    let kvm = open_kvm()?;
    let compat = host_compat(config);
    let ram = create_guest_memory(config.mem_size)?;
    let linux = matches!(config.boot, BootSource::Linux { .. });
    let mut p = Platform::build(&kvm, config, ram, compat, linux)?;
    match &config.boot {
        BootSource::Bare { program, arg } => {
            let entry = bare::load(&p.ram.mem, config.mem_size, program)?;
            bare::setup_vcpu(&p.vcpus[0], entry, config.mem_size, *arg)?;
        }
        BootSource::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            p.add_linux_devices()?;
            let spec = LinuxSpec {
                kernel,
                initrd: initrd.as_deref(),
                cmdline: cmdline.as_deref(),
                mem_size: config.mem_size,
                vcpus: config.vcpus,
                virtio: p.devices.virtio_descs(),
            };
            let entry = linux::load(&p.ram.mem, &spec, p.compat.as_ref())?;
            linux::setup_boot_cpu(&p.vcpus[0], &entry)?;
        }
        BootSource::Restore { .. } => {
            return Err(VmmError::Guest("a restore is not a boot".into()))
        }
    }
    let snapshots = p.snapshot_setup(config)?;
    p.finish(config, snapshots, None)
}

/// Builds a VM from the snapshot in `dir`: its state file `read` already
/// by the command line or the boot cache (else read here, once), checked
/// against whether the host-compat layer is active; maps guest memory onto
/// its memory layers (copy-on-write), and restores the machine through
/// [`crate::machine::restore`] before any vCPU runs.
pub fn build_from_snapshot(
    config: &VmConfig,
    dir: &std::path::Path,
    read: Option<VmSnapshot>,
) -> Result<Vmm, VmmError> {
    let started = std::time::Instant::now();
    let us = |since: std::time::Instant| since.elapsed().as_micros() as u64;
    let kvm = open_kvm()?;
    let compat = host_compat(config);
    let t = std::time::Instant::now();
    let snap = match read {
        Some(s) => s,
        None => files::read_state(dir)?,
    };
    let state_us = us(t);
    crate::snapshot::restore::check_host_compat(&snap, compat.is_some())?;
    let t = std::time::Instant::now();
    let ram = create_guest_memory(config.mem_size)?;
    let base = crate::snapshot::memory::restore_memory(dir, &snap, &ram)?;
    let memory_us = us(t);
    let linux = snap.linux;
    let t = std::time::Instant::now();
    let mut p = Platform::build(&kvm, config, ram, compat, linux)?;
    let build_us = us(t);
    let base_id = snap.id;
    p.checked = snap.memory_check.checked();
    let t = std::time::Instant::now();
    p.restore(snap)?;
    let machine_us = us(t);
    // After the restore: a Linux guest's host-compat layer now has its
    // trampoline (set up by the restore), which later snapshots save.
    let mut snapshots = p.snapshot_setup(config)?;
    snapshots.linux = linux;
    snapshots.base = dir.canonicalize().ok().map(|d| (d, base_id));
    tracing::info!(
        state_us,
        memory_us,
        build_us,
        machine_us,
        total_us = us(started),
        "restored"
    );
    p.finish(config, snapshots, Some(base))
}

impl Platform {
    /// The VM over `ram`, the console, the exit and hypercall devices, the
    /// `--net` cards, and the vCPUs.
    fn build(
        kvm: &Kvm,
        config: &VmConfig,
        ram: GuestRam,
        compat: Option<HostCompat>,
        linux: bool,
    ) -> Result<Self, VmmError> {
        let dirty_default = host_compat::dirty::default_method(compat.is_some(), linux);
        let t = std::time::Instant::now();
        // On this host creating the VM is most of a restore: its memory slot
        // and interrupt chips each wait for KVM's SRCU grace periods
        // (docs/benchmarks/snapshot.md).
        let vm = Vm::new(kvm, &ram.mem, dirty_default)?;
        let vm_us = t.elapsed().as_micros() as u64;
        enable_exit_on_emulation_failure(&vm.fd);
        let (tx, rx) = event::channel();
        let progress = Arc::new(Progress::for_vm(config));
        // A boot for the boot cache estimates its progress from the times
        // of the nearest entry's boot.
        if let Some(t) = config.boot_cache.as_ref().and_then(|s| s.previous_times()) {
            progress.set_previous(t.clone());
        }
        let serial = SerialDevice::new(&config.serial, progress.console_watch())?;
        let mut devices = DeviceManager::new(&vm, serial, &tx)?;
        let t = std::time::Instant::now();
        let vcpus = create_vcpus(kvm, &vm, config.vcpus, compat.is_some())?;
        tracing::debug!(
            vm_us,
            vcpus_us = t.elapsed().as_micros() as u64,
            "VM and vCPUs created"
        );
        let fds: Vec<_> = vcpus.iter().map(|v| &v.fd).collect();
        let (dirty_log, rings) = vm.dirty_log(&fds, &ram.layout).map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            VmError::Ioctl(
                "mapping the vCPUs' dirty rings",
                kvm_ioctls::Error::new(errno),
            )
        })?;
        let net = attach_nets(config, &vm, &ram, &mut devices, &tx)?;
        attach_disks(config, &vm, &ram, &mut devices)?;
        Ok(Self {
            vm,
            ram,
            compat,
            devices,
            net,
            vcpus,
            dirty_log,
            rings,
            events: (tx, rx),
            progress,
            checked: MemoryChecked::passed(),
        })
    }

    /// A Linux guest's platform devices, and the host-compat layer's
    /// system-call trampoline when it is active.
    fn add_linux_devices(&mut self) -> Result<(), VmmError> {
        linux::add_devices(&mut self.devices.pio, &self.events.0)?;
        if let Some(c) = self.compat.as_mut() {
            c.prepare_linux(&self.vm.fd, &self.ram.mem, &mut self.devices.mmio)?;
        }
        Ok(())
    }

    /// Puts the snapshot's machine into the new VM: a Linux guest's
    /// platform devices and trampoline first (the trampoline's pages are
    /// rewritten with the content the snapshot holds, and it gets the
    /// kernel's MSR values), then every vCPU and device.
    fn restore(&mut self, mut snap: VmSnapshot) -> Result<(), VmmError> {
        // The disks first: their images' identities are the likeliest
        // refusal, and nothing else is restored yet.
        let disks = std::mem::take(&mut snap.disks);
        crate::snapshot::disks::restore_disks(&self.devices, disks)?;
        if snap.linux {
            self.add_linux_devices()?;
            if let Some(c) = self.compat.as_mut() {
                // Infallible: a trampoline takes any MSR values.
                let _ = c.restore(&snap.trampoline);
            }
        }
        crate::snapshot::restore::restore_machine(
            &mut self.vm,
            &mut self.vcpus,
            &self.devices,
            snap,
        )?;
        Ok(())
    }

    /// What the controller needs to write snapshots of the VM.
    fn snapshot_setup(
        &self,
        config: &VmConfig,
    ) -> Result<crate::controller::SnapshotSetup, VmmError> {
        Ok(crate::controller::SnapshotSetup {
            mem_size: config.mem_size,
            linux: matches!(config.boot, BootSource::Linux { .. }),
            compat: self.compat.clone(),
            base: None,
            checked: self.checked.clone(),
        })
    }

    /// The VM, whole: console input may flow, the control API starts.
    /// A restored VM's memory still maps `lazy_base`, the snapshot's base
    /// layer, until its first checkpoint.
    fn finish(
        self,
        config: &VmConfig,
        snapshots: crate::controller::SnapshotSetup,
        lazy_base: Option<std::fs::File>,
    ) -> Result<Vmm, VmmError> {
        let Platform {
            vm,
            ram,
            compat,
            devices,
            net,
            vcpus,
            dirty_log,
            rings,
            events: (tx, rx),
            progress,
            checked,
        } = self;
        let strategy = if config.full_copy {
            Strategy::FullCopy
        } else {
            Strategy::CopyOnWrite
        };
        let mut memory = MemoryTracker::new(&ram, strategy).map_err(MemoryError::Memfd)?;
        memory.set_kvm_log(dirty_log);
        if let Some(base) = lazy_base {
            memory.set_lazy_base(base, checked.clone());
        }
        // The machine is whole now (a restore has put the UART's FIFO
        // back): console input may flow.
        devices.serial_input().open();
        // The API last, once everything that opens files is built: its
        // clients take descriptors as soon as it listens.
        let api = match &config.api_sock {
            Some(p) => {
                let to_vm = tx.clone();
                let to_vm: crate::api::ToVm =
                    Arc::new(move |c| to_vm.send(VmEvent::Api(c)).is_ok());
                Some(crate::api::start(p, to_vm)?)
            }
            None => None,
        };
        let ctx = VcpuContext {
            pio: Arc::new(devices.pio.clone()),
            mmio: Arc::new(devices.mmio.clone()),
            events: tx,
            stop: Arc::new(AtomicBool::new(false)),
            compat,
            mem: ram.mem.clone(),
            progress,
            dirty_rings: rings,
            checked,
        };
        Ok(Vmm {
            vcpus,
            ctx,
            events: rx,
            vm,
            memory,
            devices,
            net,
            api,
            snapshots,
            config: config.clone(),
            _ram: ram,
        })
    }
}

/// Creates the `--disk` devices on the MMIO bus, in the slots after the
/// net cards. A restored VM's disks, and a boot-cache VM's, are private
/// whatever the option says: a restored VM must not write the image its
/// snapshot (and its clones) lie over, and a boot saved to the cache must
/// leave the image as its key hashed it.
fn attach_disks(
    config: &VmConfig,
    vm: &Vm,
    ram: &GuestRam,
    devices: &mut DeviceManager,
) -> Result<(), VmmError> {
    let force_private =
        matches!(config.boot, BootSource::Restore { .. }) || config.boot_cache.is_some();
    for cfg in &config.disks {
        let mut cfg = cfg.clone();
        cfg.private |= force_private;
        let cfg = &cfg;
        let VirtioSlot { place, irq } = devices.virtio_slot(vm)?;
        let (dev, handle) = crate::devices::virtio::block::new_block(cfg, ram.mem.clone(), irq)
            .map_err(|e| VmmError::Disk(e.to_string()))?;
        devices.add_block(&place, dev, handle)?;
    }
    Ok(())
}

/// Creates the `--net` devices on the MMIO bus, with their interrupts, and
/// connects `bridge=` ones to the bridge with the speculation hook; the
/// others (`socket=`, `tap=`) leave the speculation domain and get the
/// output-commit hook.
fn attach_nets(
    config: &VmConfig,
    vm: &Vm,
    ram: &GuestRam,
    devices: &mut DeviceManager,
    events: &EventSender,
) -> Result<NetSpec, VmmError> {
    let deps: Arc<Mutex<SharedDeps>> = Arc::default();
    let hook_stats = Arc::default();
    let mut link = None;
    for cfg in &config.nets {
        let VirtioSlot { place, irq } = devices.virtio_slot(vm)?;
        let mac = cfg.mac_or_default(config.vm_id, place.index as u8);
        let (dev, handle) = match &cfg.backend {
            NetBackendSpec::Bridge(path) => {
                if link.is_some() {
                    return Err(VmmError::Net("only one bridge= device per VM".into()));
                }
                let (l, backend) = BridgeLink::connect(path, config.vm_id, events.clone())
                    .map_err(|e| VmmError::Net(e.to_string()))?;
                link = Some(l);
                let (dev, handle) =
                    new_net_with_backend(backend, mac, cfg.mtu, ram.mem.clone(), irq)
                        .map_err(|e| VmmError::Net(e.to_string()))?;
                let hook = SpecHook::new(deps.clone(), events.clone(), Arc::clone(&hook_stats));
                handle.set_hook(Box::new(hook));
                (dev, handle)
            }
            _ => {
                let mut c = cfg.clone();
                c.mac = Some(mac);
                let (dev, handle) =
                    new_net(c, ram.mem.clone(), irq).map_err(|e| VmmError::Net(e.to_string()))?;
                let hook = OutputCommitHook::new(place.index as usize, deps.clone());
                handle.set_hook(Box::new(hook));
                (dev, handle)
            }
        };
        devices.add_net(&place, dev, handle)?;
    }
    let holds_output = config
        .nets
        .iter()
        .any(|c| !matches!(c.backend, NetBackendSpec::Bridge(_)));
    if holds_output {
        let nets = devices.nets();
        crate::spec::link::spawn_releaser(
            deps.clone(),
            nets.iter().map(NetHandle::backend).collect(),
            nets.iter().map(NetHandle::tx_waker).collect(),
        )
        .map_err(VmmError::Thread)?;
    }
    Ok(NetSpec::new(link, deps, hook_stats))
}

fn create_vcpus(kvm: &Kvm, vm: &Vm, count: u8, reduce: bool) -> Result<Vec<Vcpu>, VmmError> {
    let mut supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
    if reduce {
        let hidden = cpuid::reduce(supported.as_mut_slice());
        tracing::info!("host compat: CPUID hides {}", hidden.join(" "));
    }
    let fds = (0..count)
        .map(|i| {
            let fd = vm
                .fd
                .create_vcpu(u64::from(i))
                .map_err(|e| VmmError::Vcpu(i, "KVM_CREATE_VCPU", e))?;
            let mut cpuid = supported.clone();
            set_vcpu_identity(cpuid.as_mut_slice(), i);
            fd.set_cpuid2(&cpuid)
                .map_err(|e| VmmError::Vcpu(i, "KVM_SET_CPUID2", e))?;
            Ok(fd)
        })
        .collect::<Result<Vec<_>, VmmError>>()?;
    let Some(first) = fds.first() else {
        return Err(VmmError::Guest("a VM needs a vCPU".into()));
    };
    let caps = Arc::new(StateCaps::probe(kvm, first));
    tracing::info!(
        xsave = caps.xsave,
        xcrs = caps.xcrs,
        msrs = caps.msrs.len(),
        "vCPU state to save"
    );
    // How much of the vCPU state passes through `kvm_run` (see `SyncRegs`).
    let offered = if std::env::var_os("SPECVM_NO_SYNC_REGS").is_some() {
        0
    } else {
        kvm.check_extension_raw(kvm_bindings::KVM_CAP_SYNC_REGS.into()) as u32
    };
    let all = kvm_bindings::KVM_SYNC_X86_REGS
        | kvm_bindings::KVM_SYNC_X86_SREGS
        | kvm_bindings::KVM_SYNC_X86_EVENTS;
    let sync = if offered & all != all {
        SyncRegs::Off
    } else if count == 1 {
        SyncRegs::OneVcpu
    } else {
        SyncRegs::ManyVcpus
    };
    tracing::info!(?sync, "vCPU state through kvm_run");
    Ok(fds
        .into_iter()
        .zip(0..)
        .map(|(fd, index)| {
            let mut v = Vcpu::new(fd, index, caps.clone());
            v.use_sync_regs(sync);
            v
        })
        .collect())
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

impl Vmm {
    /// Runs the VM until the guest ends it or a vCPU fails, then stops
    /// every vCPU thread and returns how it ended.
    pub fn run(self) -> Result<Outcome, VmmError> {
        register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmmError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
        let Vmm {
            vcpus,
            ctx,
            events,
            vm,
            memory,
            devices,
            net,
            api,
            snapshots,
            config,
            _ram,
        } = self;
        crate::signals::spawn_waiter(ctx.events.clone()).map_err(VmmError::Thread)?;
        let stop = ctx.stop.clone();
        let _monitor = progress::spawn_monitor(
            ctx.progress.clone(),
            ctx.compat.clone(),
            stop.clone(),
            kick_signal(),
        )?;
        let handles = spawn_vcpus(vcpus, &ctx)?;
        let machine = LiveMachine {
            vm,
            vcpus: VcpuSet::new(handles, stop),
            memory,
            devices,
            compat: ctx.compat.clone(),
            snapshots: Some(snapshots),
            stats: Default::default(),
        };
        let progress = ctx.progress.clone();
        // Only the vCPU threads hold senders now: if they all end without a
        // word, the controller's receive fails rather than waiting forever.
        drop(ctx);
        let mut controller = Controller::new(ControllerParts {
            machine,
            events,
            vm_id: config.vm_id,
            budget: config.checkpoint_budget,
            publish: api.as_ref().map(|a| a.events.clone()),
            net,
            boot_cache: config.boot_cache.clone().map(|save| (save, progress)),
        });
        let r = controller.run(config.start_paused);
        if config.stats {
            eprintln!("specvm-stats {}", controller.stats_summary());
        }
        drop(api);
        r.map_err(|e| VmmError::Guest(e.to_string()))
    }
}

/// Starts a thread per vCPU, each with its own pair of channels to the
/// controller.
fn spawn_vcpus(vcpus: Vec<Vcpu>, ctx: &VcpuContext) -> Result<Vec<VcpuHandle>, VmmError> {
    let mut handles = Vec::new();
    for vcpu in vcpus {
        let c = ctx.clone();
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        let attention = Arc::new(crate::vstate::vcpu::Attention::default());
        let call = Arc::new(crate::vstate::vcpu::CallSlot::default());
        let link = VcpuLink {
            cmds: cmd_rx,
            replies: reply_tx,
            attention: attention.clone(),
            call: call.clone(),
        };
        let name = format!("vcpu{}", vcpu.index);
        match std::thread::Builder::new()
            .name(name)
            .spawn(move || run_guarded(vcpu, c, link))
        {
            Ok(t) => handles.push(VcpuHandle::new(cmd_tx, reply_rx, attention, call, t)),
            Err(e) => {
                ctx.stop.store(true, Ordering::Release);
                return Err(VmmError::Thread(e));
            }
        }
    }
    Ok(handles)
}

/// Runs a vCPU, turning a panic in its thread into a fatal VM event, so the
/// controller never waits for an exit that will not come.
fn run_guarded(vcpu: Vcpu, ctx: VcpuContext, link: VcpuLink) {
    let index = vcpu.index;
    let events = ctx.events.clone();
    let progress = ctx.progress.clone();
    progress.thread_started(index);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || vcpu.run(ctx, link)));
    progress.thread_ending(index);
    if r.is_err() {
        let _ = events.send(VmEvent::Fatal(format!("vCPU {index}: thread panicked")));
    }
}
