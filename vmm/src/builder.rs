//! Puts a VM together from its configuration, and runs it to its end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use guest_agent::abi::{
    EXIT_PORT, EXIT_PORT_LEN, HYPERCALL_PORT, HYPERCALL_PORT_LEN, SERIAL_PORT, SERIAL_PORT_LEN,
};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::controller::{Controller, VcpuHandle};
use crate::devices::virtio::net::{new_net, new_net_with_backend, NetBackendSpec, NetHandle};
use crate::devices::virtio::{mmio_slot_base, virtio_gsi, VIRTIO_MMIO_SIZE};
use crate::spec::hypercall::HypercallDevice;
use crate::spec::link::{BridgeLink, OutputCommitHook, SharedDeps, SpecHook};
use crate::spec::memory::{MemoryTracker, Strategy};
use crate::vstate::vcpu::VcpuLink;
use crate::vstate::vcpu_state::StateCaps;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::VirtioMmioDesc;
use crate::arch::x86_64::cpuid::set_vcpu_identity;
use crate::bare::{self, BareError};
use crate::config::{BootSource, VmConfig};
use crate::devices::bus::SharedDevice;
use crate::devices::legacy::serial::{InputGate, SerialError};
use crate::devices::legacy::{ExitDevice, SerialDevice};
use crate::devices::{Bus, BusError};
use crate::event::{self, EventReceiver, VmEvent};
use crate::host_compat::{self, cpuid, HostCompat, HostCompatError};
use crate::linux::{self, LinuxError, LinuxSpec};
use crate::progress::{self, Progress, ProgressError};
use crate::snapshot::files;
use crate::vstate::memory::{create_guest_memory, GuestRam, MemoryError};
use crate::vstate::vcpu::{enable_exit_on_emulation_failure, Vcpu, VcpuContext};
use crate::vstate::vm::{open_kvm, Vm, VmError};

/// The legacy ISA interrupt line of COM1.
const COM1_IRQ: u32 = 4;

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
    devices: Vec<SharedDevice>,
    vm_id: u32,
    api: Option<crate::api::ApiServer>,
    print_stats: bool,
    start_paused: bool,
    boot_cache: Option<crate::boot_cache::PendingSave>,
    network: Network,
    snapshots: crate::controller::SnapshotSetup,
    _ram: GuestRam,
}

/// The VM's network devices, its port on the bridge, and the dependency
/// set their hooks read.
#[derive(Default)]
struct Network {
    /// The cards' windows and interrupts, for the ACPI tables.
    descs: Vec<VirtioMmioDesc>,
    nets: Vec<NetHandle>,
    link: Option<BridgeLink>,
    deps: Arc<Mutex<SharedDeps>>,
}

/// Creates the `--net` devices on the MMIO bus, with their interrupts, and
/// connects `bridge=` ones to the bridge with the speculation hook; the
/// others (`socket=`, `tap=`) leave the speculation domain and get the
/// output-commit hook.
fn attach_nets(
    config: &VmConfig,
    vm: &Vm,
    mem: &crate::vstate::memory::GuestMemoryMmap,
    mmio: &mut Bus,
    devices: &mut Vec<SharedDevice>,
    events: &crate::event::EventSender,
) -> Result<Network, VmmError> {
    let mut network = Network::default();
    for (slot, cfg) in config.nets.iter().enumerate() {
        let slot = slot as u32;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Net(e.to_string()))?;
        vm.fd
            .register_irqfd(&irq, virtio_gsi(slot))
            .map_err(|e| VmError::Ioctl("KVM_IRQFD (virtio)", e))?;
        let mac = cfg.mac_or_default(config.vm_id, slot as u8);
        let (dev, handle) = match &cfg.backend {
            NetBackendSpec::Bridge(path) => {
                if network.link.is_some() {
                    return Err(VmmError::Net("only one bridge= device per VM".into()));
                }
                let (link, backend) = BridgeLink::connect(path, config.vm_id, events.clone())
                    .map_err(|e| VmmError::Net(e.to_string()))?;
                network.link = Some(link);
                let (dev, handle) = new_net_with_backend(backend, mac, cfg.mtu, mem.clone(), irq)
                    .map_err(|e| VmmError::Net(e.to_string()))?;
                let stats = Arc::default();
                handle.set_hook(Box::new(SpecHook::new(
                    network.deps.clone(),
                    events.clone(),
                    stats,
                )));
                (dev, handle)
            }
            _ => {
                let mut c = cfg.clone();
                c.mac = Some(mac);
                let (dev, handle) =
                    new_net(c, mem.clone(), irq).map_err(|e| VmmError::Net(e.to_string()))?;
                handle.set_hook(Box::new(OutputCommitHook::new(
                    slot as usize,
                    network.deps.clone(),
                )));
                (dev, handle)
            }
        };
        mmio.insert(dev.clone(), mmio_slot_base(slot), VIRTIO_MMIO_SIZE)?;
        network.descs.push(VirtioMmioDesc {
            base: mmio_slot_base(slot) as u32,
            size: VIRTIO_MMIO_SIZE as u32,
            gsi: virtio_gsi(slot),
        });
        devices.push(dev);
        network.nets.push(handle);
    }
    let holds_output = config
        .nets
        .iter()
        .any(|c| !matches!(c.backend, NetBackendSpec::Bridge(_)));
    if holds_output {
        crate::spec::link::spawn_releaser(
            network.deps.clone(),
            network.nets.iter().map(NetHandle::backend).collect(),
            network.nets.iter().map(NetHandle::tx_waker).collect(),
        )
        .map_err(VmmError::Thread)?;
    }
    Ok(network)
}

/// The port I/O devices every VM has: the serial console (with its
/// interrupt), the exit device and the hypercall device. Returns the bus
/// and the serial device, whose state checkpoints save.
fn port_devices(
    config: &VmConfig,
    vm: &Vm,
    tx: &crate::event::EventSender,
    progress: &Progress,
) -> Result<(Bus, SharedDevice, InputGate), VmmError> {
    let serial = SerialDevice::new(&config.serial, progress.console_watch())?;
    let gate = serial.input_gate();
    let serial_irq = serial.interrupt_evt().map_err(SerialError::EventFd)?;
    vm.fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|e| VmError::Ioctl("KVM_IRQFD (COM1)", e))?;
    let mut pio = Bus::new();
    let serial: SharedDevice = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), SERIAL_PORT.into(), SERIAL_PORT_LEN.into())?;
    let exit: SharedDevice = Arc::new(Mutex::new(ExitDevice::new(tx.clone())));
    pio.insert(exit, EXIT_PORT.into(), EXIT_PORT_LEN.into())?;
    let hypercall: SharedDevice = Arc::new(Mutex::new(HypercallDevice));
    pio.insert(hypercall, HYPERCALL_PORT.into(), HYPERCALL_PORT_LEN.into())?;
    Ok((pio, serial, gate))
}

/// What loading a guest touches besides the guest itself.
struct Platform<'a> {
    vm: &'a Vm,
    ram: &'a GuestRam,
    pio: &'a mut Bus,
    mmio: &'a mut Bus,
    tx: &'a crate::event::EventSender,
}

/// Puts the guest in place: a bare program, a Linux kernel with its
/// platform devices and ACPI tables, or (for a restore) the devices a
/// restored Linux guest needs.
fn load_guest(
    p: Platform<'_>,
    config: &VmConfig,
    boot_cpu: &Vcpu,
    virtio: &[VirtioMmioDesc],
    mut compat: Option<&mut HostCompat>,
    restoring: Option<&Restoring>,
) -> Result<(), VmmError> {
    match &config.boot {
        BootSource::Bare { program, arg } => {
            let entry = bare::load(&p.ram.mem, config.mem_size, program)?;
            bare::setup_vcpu(boot_cpu, entry, config.mem_size, *arg)?;
        }
        BootSource::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            linux::add_devices(p.pio, p.tx)?;
            if let Some(c) = compat.as_deref_mut() {
                c.prepare_linux(&p.vm.fd, &p.ram.mem, p.mmio)?;
            }
            let spec = LinuxSpec {
                kernel,
                initrd: initrd.as_deref(),
                cmdline: cmdline.as_deref(),
                mem_size: config.mem_size,
                vcpus: config.vcpus,
                virtio,
            };
            let entry = linux::load(&p.ram.mem, &spec, compat.as_deref())?;
            linux::setup_boot_cpu(boot_cpu, &entry)?;
        }
        BootSource::Restore { .. } => {
            restore_linux_devices(restoring, p.pio, p.tx, compat, p.vm, p.ram, p.mmio)?
        }
    }
    Ok(())
}

/// Builds a VM from `config`: memory, the VM, devices, vCPUs, and the guest.
pub fn build(config: &VmConfig) -> Result<Vmm, VmmError> {
    let kvm = open_kvm()?;
    let detection = host_compat::detect(config.host_compat);
    tracing::info!(
        active = detection.active,
        "host compat: {}",
        detection.reason
    );
    let mut compat = detection.active.then(HostCompat::new);

    let ram = create_guest_memory(config.mem_size)?;
    let restoring = open_restore(config, &ram, compat.is_some())?;
    let vm = Vm::new(&kvm, &ram.mem)?;
    enable_exit_on_emulation_failure(&vm.fd);

    let (tx, rx) = event::channel();
    let progress = Arc::new(Progress::for_vm(config));
    // A boot for the boot cache estimates its progress from the times of
    // the nearest entry's boot.
    if let Some(t) = config.boot_cache.as_ref().and_then(|s| s.previous_times()) {
        progress.set_previous(t.clone());
    }
    let (mut pio, serial, serial_input) = port_devices(config, &vm, &tx, &progress)?;
    let mut mmio = Bus::new();

    let vcpus = create_vcpus(&kvm, &vm, config.vcpus, compat.is_some())?;
    let caps = Arc::new(StateCaps::probe(&kvm, &vcpus[0].fd));
    tracing::info!(
        xsave = caps.xsave,
        xcrs = caps.xcrs,
        msrs = caps.msrs.len(),
        "vCPU state to save"
    );
    let strategy = if config.full_copy {
        Strategy::FullCopy
    } else {
        Strategy::CopyOnWrite
    };
    let mut memory = MemoryTracker::new(&ram, strategy).map_err(MemoryError::Memfd)?;
    let mut devices = vec![serial];
    let network = attach_nets(config, &vm, &ram.mem, &mut mmio, &mut devices, &tx)?;
    let platform = Platform {
        vm: &vm,
        ram: &ram,
        pio: &mut pio,
        mmio: &mut mmio,
        tx: &tx,
    };
    load_guest(
        platform,
        config,
        &vcpus[0],
        &network.descs,
        compat.as_mut(),
        restoring.as_ref(),
    )?;
    let (snapshots, lazy_base) = restore_or_fresh(
        &vm,
        &vcpus,
        &devices,
        restoring,
        &ram,
        config,
        compat.as_ref(),
    )?;
    if let Some(base) = lazy_base {
        memory.set_lazy_base(base);
    }
    // The machine is whole now (a restore has put the UART's FIFO back):
    // console input may flow.
    serial_input.open();
    let api = match &config.api_sock {
        Some(p) => Some(crate::api::start(p, tx.clone())?),
        None => None,
    };
    let ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        events: tx,
        stop: Arc::new(AtomicBool::new(false)),
        compat,
        mem: ram.mem.clone(),
        caps,
        progress,
    };
    Ok(Vmm {
        vcpus,
        ctx,
        events: rx,
        vm,
        memory,
        devices,
        vm_id: config.vm_id,
        api,
        print_stats: config.stats,
        start_paused: config.start_paused,
        boot_cache: config.boot_cache.clone(),
        network,
        snapshots,
        _ram: ram,
    })
}

/// A snapshot being restored: its state, and its base memory layer, which
/// guest memory maps until the VM's first checkpoint.
struct Restoring {
    dir: std::path::PathBuf,
    snap: crate::snapshot::VmSnapshot,
    base: std::fs::File,
    started: std::time::Instant,
    memory_us: u64,
}

/// With `--restore`, reads and checks the snapshot (also against whether
/// the host-compat layer is active) and maps guest memory onto it
/// (copy-on-write).
fn open_restore(
    config: &VmConfig,
    ram: &GuestRam,
    compat_active: bool,
) -> Result<Option<Restoring>, VmmError> {
    let BootSource::Restore { dir } = &config.boot else {
        return Ok(None);
    };
    let started = std::time::Instant::now();
    let snap = files::read_state(dir)?;
    crate::snapshot::restore::check_host_compat(&snap, compat_active)?;
    let base = crate::snapshot::memory::restore_memory(dir, &snap, ram)?;
    Ok(Some(Restoring {
        dir: dir.clone(),
        snap,
        base,
        started,
        memory_us: started.elapsed().as_micros() as u64,
    }))
}

/// With a snapshot, restores its machine state into the new VM; either
/// way, what the controller needs to write snapshots of it. With a
/// snapshot, also its base memory layer, which guest memory maps until the
/// memory tracker materializes it.
fn restore_or_fresh(
    vm: &Vm,
    vcpus: &[Vcpu],
    devices: &[SharedDevice],
    restoring: Option<Restoring>,
    ram: &GuestRam,
    config: &VmConfig,
    compat: Option<&HostCompat>,
) -> Result<(crate::controller::SnapshotSetup, Option<std::fs::File>), VmmError> {
    let mut setup = crate::controller::SnapshotSetup {
        file: ram.file.try_clone().map_err(MemoryError::Memfd)?,
        mem_size: config.mem_size,
        linux: matches!(config.boot, BootSource::Linux { .. }),
        compat: compat.cloned(),
        base: None,
    };
    let mut lazy_base = None;
    if let Some(r) = restoring {
        let fds: Vec<&kvm_ioctls::VcpuFd> = vcpus.iter().map(|v| &v.fd).collect();
        crate::snapshot::restore::restore_machine(&vm.fd, &fds, devices, &r.snap)?;
        setup.linux = r.snap.linux;
        setup.base = r.dir.canonicalize().ok().map(|d| (d, r.snap.id));
        lazy_base = Some(r.base);
        tracing::info!(
            memory_us = r.memory_us,
            total_us = r.started.elapsed().as_micros() as u64,
            "restored"
        );
    }
    Ok((setup, lazy_base))
}

/// A restored Linux guest gets its platform devices and host-compat
/// trampoline again (the trampoline's pages are rewritten with the same
/// content the snapshot holds), and the trampoline gets the kernel's MSR
/// values the snapshot saved, before any vCPU runs. `open_restore` has
/// checked that host compat is active exactly when the snapshot has
/// trampoline state.
fn restore_linux_devices(
    restoring: Option<&Restoring>,
    pio: &mut Bus,
    tx: &crate::event::EventSender,
    compat: Option<&mut HostCompat>,
    vm: &Vm,
    ram: &GuestRam,
    mmio: &mut Bus,
) -> Result<(), VmmError> {
    if !restoring.is_some_and(|r| r.snap.linux) {
        return Ok(());
    }
    linux::add_devices(pio, tx)?;
    if let Some(c) = compat {
        c.prepare_linux(&vm.fd, &ram.mem, mmio)?;
        if let Some(t) = restoring.and_then(|r| r.snap.trampoline.as_ref()) {
            c.restore_trampoline(t);
        }
    }
    Ok(())
}

fn create_vcpus(kvm: &Kvm, vm: &Vm, count: u8, reduce: bool) -> Result<Vec<Vcpu>, VmmError> {
    let mut supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
    if reduce {
        let hidden = cpuid::reduce(supported.as_mut_slice());
        tracing::info!("host compat: CPUID hides {}", hidden.join(" "));
    }
    (0..count)
        .map(|i| {
            let fd = vm
                .fd
                .create_vcpu(u64::from(i))
                .map_err(|e| VmmError::Vcpu(i, "KVM_CREATE_VCPU", e))?;
            let mut cpuid = supported.clone();
            set_vcpu_identity(cpuid.as_mut_slice(), i);
            fd.set_cpuid2(&cpuid)
                .map_err(|e| VmmError::Vcpu(i, "KVM_SET_CPUID2", e))?;
            Ok(Vcpu { fd, index: i })
        })
        .collect()
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
            vm_id,
            api,
            print_stats,
            start_paused,
            boot_cache,
            network,
            snapshots,
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
        let mut handles = Vec::new();
        for vcpu in vcpus {
            let c = ctx.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let attention = Arc::new(AtomicBool::new(false));
            let link = VcpuLink {
                cmds: rx,
                attention: attention.clone(),
            };
            let name = format!("vcpu{}", vcpu.index);
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || run_guarded(vcpu, c, link))
            {
                Ok(t) => handles.push(VcpuHandle::new(tx, attention, t)),
                Err(e) => {
                    stop.store(true, Ordering::Release);
                    return Err(VmmError::Thread(e));
                }
            }
        }
        let ctx_compat_active = ctx.compat.is_some();
        let progress = ctx.progress.clone();
        // Only the vCPU threads hold senders now: if they all end without a
        // word, the controller's receive fails rather than waiting forever.
        drop(ctx);
        let mut controller = Controller::new(vm.fd, handles, events, stop, memory, devices, vm_id);
        if let Some(api) = &api {
            controller.publish_to(api.events.clone());
        }
        controller.attach_network(network.nets, network.link, network.deps);
        if ctx_compat_active {
            controller.use_shadow_paging_reset();
        }
        controller.enable_snapshots(snapshots);
        if let Some(save) = boot_cache {
            controller.save_when_ready(save, progress);
        }
        let r = controller.run(start_paused);
        if print_stats {
            eprintln!("specvm-stats {}", controller.stats.summary());
        }
        r.map_err(|e| VmmError::Guest(e.to_string()))
    }
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
