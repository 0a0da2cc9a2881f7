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
use crate::spec::hypercall::HypercallDevice;
use crate::spec::memory::MemoryTracker;
use crate::vstate::vcpu::VcpuLink;
use crate::vstate::vcpu_state::StateCaps;

use crate::arch::x86_64::cpuid::set_vcpu_identity;
use crate::bare::{self, BareError};
use crate::config::{BootSource, VmConfig};
use crate::devices::bus::SharedDevice;
use crate::devices::legacy::serial::SerialError;
use crate::devices::legacy::{ExitDevice, SerialDevice};
use crate::devices::virtio::setup::{attach_net, SetupError};
use crate::devices::{Bus, BusError};
use crate::event::{self, EventReceiver, VmEvent};
use crate::host_compat::{self, cpuid, HostCompat, HostCompatError};
use crate::linux::{self, LinuxError, LinuxSpec};
use crate::progress::{self, Progress, ProgressError};
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
    /// The Linux boot could not be prepared.
    #[error(transparent)]
    Linux(#[from] LinuxError),
    /// The host-compat layer could not be set up.
    #[error(transparent)]
    Compat(#[from] HostCompatError),
    /// A virtio device could not be attached.
    #[error(transparent)]
    Virtio(#[from] SetupError),
    /// The progress monitor could not be started.
    #[error(transparent)]
    Progress(#[from] ProgressError),
    /// A thread could not be started.
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
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
    _ram: GuestRam,
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
    let vm = Vm::new(&kvm, &ram.mem)?;
    enable_exit_on_emulation_failure(&vm.fd);

    let (tx, rx) = event::channel();
    let serial = SerialDevice::new(&config.serial)?;
    let serial_irq = serial.interrupt_evt().map_err(SerialError::EventFd)?;
    vm.fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|e| VmError::Ioctl("KVM_IRQFD (COM1)", e))?;
    let mut pio = Bus::new();
    // Virtio-mmio devices will live here.
    let mut mmio = Bus::new();
    let serial: SharedDevice = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), SERIAL_PORT.into(), SERIAL_PORT_LEN.into())?;
    let exit: SharedDevice = Arc::new(Mutex::new(ExitDevice::new(tx.clone())));
    pio.insert(exit, EXIT_PORT.into(), EXIT_PORT_LEN.into())?;

    pio.insert(
        Arc::new(Mutex::new(HypercallDevice)),
        HYPERCALL_PORT.into(),
        HYPERCALL_PORT_LEN.into(),
    )?;

    let vcpus = create_vcpus(&kvm, &vm, config.vcpus, compat.is_some())?;
    let caps = Arc::new(StateCaps::probe(&kvm, &vcpus[0].fd));
    tracing::info!(
        xsave = caps.xsave,
        xcrs = caps.xcrs,
        msrs = caps.msrs.len(),
        "vCPU state to save"
    );
    let memory = MemoryTracker::new(&ram.mem, &ram.file).map_err(MemoryError::Memfd)?;
    let mut buses = Buses {
        pio: &mut pio,
        mmio: &mut mmio,
    };
    load_guest(config, &vm, &ram, &vcpus, &mut buses, &tx, &mut compat)?;
    let ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        events: tx,
        stop: Arc::new(AtomicBool::new(false)),
        compat,
        mem: ram.mem.clone(),
        caps,
        progress: Arc::new(Progress::new(config.vcpus)),
    };
    Ok(Vmm {
        vcpus,
        ctx,
        events: rx,
        vm,
        memory,
        devices: vec![serial],
        vm_id: config.vm_id,
        _ram: ram,
    })
}

/// The two device buses, while devices are being placed.
struct Buses<'a> {
    pio: &'a mut Bus,
    mmio: &'a mut Bus,
}

/// Loads what `config` boots, with the devices only that guest kind
/// needs, and puts the boot vCPU at its entry.
fn load_guest(
    config: &VmConfig,
    vm: &Vm,
    ram: &GuestRam,
    vcpus: &[Vcpu],
    buses: &mut Buses,
    events: &event::EventSender,
    compat: &mut Option<HostCompat>,
) -> Result<(), VmmError> {
    match &config.boot {
        BootSource::Bare { program, arg } => {
            let entry = bare::load(&ram.mem, config.mem_size, program)?;
            bare::setup_vcpu(&vcpus[0], entry, config.mem_size, *arg)?;
        }
        BootSource::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            linux::add_devices(buses.pio, events)?;
            let virtio = attach_net(&vm.fd, &ram.mem, buses.mmio, &config.net, config.vm_id)?;
            if let Some(c) = compat.as_mut() {
                c.prepare_linux(&vm.fd, &ram.mem, buses.mmio)?;
            }
            let spec = LinuxSpec {
                kernel,
                initrd: initrd.as_deref(),
                cmdline: cmdline.as_deref(),
                mem_size: config.mem_size,
                vcpus: config.vcpus,
                virtio: &virtio,
            };
            let entry = linux::load(&ram.mem, &spec, compat.as_ref())?;
            linux::setup_boot_cpu(&vcpus[0], &entry)?;
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
            _ram,
        } = self;
        let stop = ctx.stop.clone();
        progress::spawn_monitor(
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
        // Only the vCPU threads hold senders now: if they all end without a
        // word, the controller's receive fails rather than waiting forever.
        drop(ctx);
        let mut controller = Controller::new(vm.fd, handles, events, stop, memory, devices, vm_id);
        let r = controller.run();
        tracing::info!(stats = ?controller.stats, "speculation operations");
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
