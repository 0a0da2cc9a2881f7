//! KVM-free tests of the state file: round trip and every refusal.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_xcrs, kvm_xsave};
use vm_superio::serial::SerialState;

use super::codec::{self, HEADER_LEN};
use super::restore::check_host_compat;
use super::*;
use crate::device_manager::DeviceStates;
use crate::devices::virtio::{NetState, SavedQueue, TransportState};
use crate::machine::MachineState;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;

fn vcpu(i: u64, xsave: bool) -> VcpuState {
    let mut s = VcpuState {
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: xsave.then(|| Box::new(kvm_xsave::default())),
        fpu: (!xsave).then(|| kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        }),
        xcrs: xsave.then(kvm_xcrs::default),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: vec![
            kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            };
            3
        ],
        events: Default::default(),
    };
    s.regs.rip = 0x40_0000 + i;
    s.regs.rax = i;
    s.sregs.cr3 = 0x1000;
    s.lapic.regs[0x20] = 1;
    if let Some(x) = s.xsave.as_mut() {
        x.region[5] = 0xabcd;
    }
    s
}

pub(super) fn sample() -> VmSnapshot {
    let mut vm = VmState {
        irqchips: Default::default(),
        pit: Default::default(),
        clock: Default::default(),
    };
    vm.clock.clock = 999;
    let net = NetState {
        transport: TransportState {
            status: 15,
            device_features_sel: 1,
            driver_features_sel: 0,
            driver_features: 1 << 32,
            queue_sel: 1,
            interrupt_status: 1,
            config_generation: 0,
            queues: vec![
                SavedQueue {
                    regs: Default::default(),
                    queue: Default::default(),
                };
                2
            ],
        },
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1460,
    };
    VmSnapshot {
        id: 0x1234,
        layers: vec![
            Layer {
                id: 0x1000,
                extents: vec![(0, 0x3000), (0x10_0000, 0x2_0000)],
                sums: vec![1, 2, 3],
            },
            Layer {
                id: 0x1234,
                extents: vec![],
                sums: vec![],
            },
        ],
        mem_size: 64 << 20,
        ranges: RamLayout::new(64 << 20).gpa_ranges(),
        linux: false,
        trampoline: None,
        saved_at_ns: 7,
        machine: MachineState {
            vcpus: vec![vcpu(0, true), vcpu(1, false)],
            vm,
            devices: DeviceStates {
                serial: SerialState {
                    in_buffer: b"hi".to_vec(),
                    ..Default::default()
                },
                nets: vec![net.clone(), net],
                blocks: Vec::new(),
            },
        },
        disks: Vec::new(),
        memory_check: Default::default(),
    }
}

#[test]
fn state_round_trips() {
    let s = sample();
    let bytes = s.encode();
    let back = VmSnapshot::decode(&bytes).unwrap();
    assert_eq!(back.encode(), bytes, "re-encoding gives the same file");
    let (m, saved) = (&back.machine, &s.machine);
    assert_eq!(m.vcpus[1].regs.rip, 0x40_0001);
    assert_eq!(m.vcpus[0].xsave.as_ref().unwrap().region[5], 0xabcd);
    assert_eq!(m.vcpus[1].fpu.unwrap().mxcsr, 0x1f80);
    assert_eq!(m.vcpus[0].msrs.len(), 3);
    assert_eq!(m.vm.clock.clock, 999);
    assert_eq!(m.devices, saved.devices);
    assert_eq!(back.ranges, s.ranges);
}

#[test]
fn every_truncation_is_refused() {
    let bytes = sample().encode();
    for n in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
        let e = VmSnapshot::decode(&bytes[..n]).err().expect("truncated");
        assert!(
            matches!(e, SnapshotError::Truncated { .. }),
            "{n} bytes: {e}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}

#[test]
fn corruption_is_refused() {
    let bytes = sample().encode();
    for at in [HEADER_LEN, HEADER_LEN + 100, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[at] ^= 0x40;
        let e = VmSnapshot::decode(&b).err().expect("corrupt");
        assert!(matches!(e, SnapshotError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("corrupt: its checksum"), "{e}");
    }
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(
        VmSnapshot::decode(&b),
        Err(SnapshotError::BadMagic)
    ));
    let mut b = bytes;
    b.push(0);
    assert!(matches!(
        VmSnapshot::decode(&b),
        Err(SnapshotError::Corrupt(_))
    ));
}

#[test]
fn other_versions_are_refused() {
    let mut b = sample().encode();
    b[8..12].copy_from_slice(&(codec::FORMAT_VERSION + 1).to_le_bytes());
    let e = VmSnapshot::decode(&b).err().expect("version");
    assert!(
        matches!(e, SnapshotError::Version { found, .. } if found == codec::FORMAT_VERSION + 1)
    );
    let want = format!(
        "format version {} is not supported (this specvm reads version {})",
        codec::FORMAT_VERSION + 1,
        codec::FORMAT_VERSION
    );
    assert!(e.to_string().contains(&want), "{e}");
}

#[test]
fn older_versions_are_refused() {
    for v in [1u32, 2, 3] {
        let mut b = sample().encode();
        b[8..12].copy_from_slice(&v.to_le_bytes());
        let e = VmSnapshot::decode(&b).err().expect("old version");
        let want = format!("format version {v} is not supported (this specvm reads version 4)");
        assert!(e.to_string().contains(&want), "{e}");
    }
}

#[test]
fn the_reserved_header_word_must_be_zero() {
    let mut b = sample().encode();
    b[12] = 0x80;
    let e = VmSnapshot::decode(&b).err().expect("reserved");
    assert!(
        e.to_string().contains("reserved header word is 0x80"),
        "{e}"
    );
}

#[test]
fn layer_records_must_fit_the_memory_and_name_unique_files() {
    let mut s = sample();
    s.layers[0].extents[1] = (s.mem_size, 0x1000);
    s.layers[0].sums.pop();
    let e = VmSnapshot::decode(&s.encode()).err().expect("past memory");
    assert!(e.to_string().contains("past the memory size"), "{e}");
    let mut s = sample();
    s.layers[0].id = s.id;
    let e = VmSnapshot::decode(&s.encode())
        .err()
        .expect("same id twice");
    assert!(e.to_string().contains("memory layers"), "{e}");
}

fn linux_sample(kernel_lstar: u64) -> VmSnapshot {
    let mut s = sample();
    s.linux = true;
    s.trampoline = Some(TrampolineState {
        kernel_lstar,
        star: (0x23u64 << 48) | (0x10 << 32),
        sfmask: 0x47700,
    });
    s
}

#[test]
fn trampoline_state_round_trips() {
    for lstar in [0, 0xffff_ffff_81a0_0080] {
        let s = linux_sample(lstar);
        let bytes = s.encode();
        let back = VmSnapshot::decode(&bytes).unwrap();
        assert_eq!(back.trampoline, s.trampoline);
        assert!(back.linux);
        assert_eq!(back.encode(), bytes);
    }
    let mut s = linux_sample(1);
    s.trampoline = None;
    assert_eq!(VmSnapshot::decode(&s.encode()).unwrap().trampoline, None);
}

#[test]
fn trampoline_state_in_a_bare_guest_is_refused() {
    let mut s = linux_sample(0xffff_ffff_81a0_0080);
    s.linux = false;
    let e = VmSnapshot::decode(&s.encode())
        .err()
        .expect("bare + trampoline");
    assert!(matches!(e, SnapshotError::Corrupt(_)), "{e}");
    assert!(e.to_string().contains("trampoline"), "{e}");
}

#[test]
fn restore_refuses_a_change_of_host_compat_for_linux_guests() {
    let installed = linux_sample(0xffff_ffff_81a0_0080);
    check_host_compat(&installed, true).unwrap();
    let e = check_host_compat(&installed, false).unwrap_err();
    assert!(matches!(e, SnapshotError::Mismatch(_)), "{e}");
    assert!(
        e.to_string().contains("LSTAR points at the host-compat"),
        "{e}"
    );
    assert!(e.to_string().contains("0xffffffff81a00080"), "{e}");
    assert!(e.to_string().contains("--host-compat on"), "{e}");
    // Saved with the layer on before the kernel set LSTAR: its CPUID and
    // command line are still the layer's.
    let early = linux_sample(0);
    check_host_compat(&early, true).unwrap();
    let e = check_host_compat(&early, false).unwrap_err();
    assert!(e.to_string().contains("--host-compat on"), "{e}");
    let mut without = linux_sample(0);
    without.trampoline = None;
    check_host_compat(&without, false).unwrap();
    let e = check_host_compat(&without, true).unwrap_err();
    assert!(e.to_string().contains("--host-compat off"), "{e}");
    // Bare guests use no trampoline: either way is fine.
    check_host_compat(&sample(), true).unwrap();
    check_host_compat(&sample(), false).unwrap();
}

#[test]
fn a_valid_checksum_over_a_bad_payload_is_refused() {
    // A payload that checks out but lies about its contents: an unknown
    // device kind, and a layout that is not this build's.
    let s = sample();
    let mut w = codec::Writer::default();
    w.u64(1);
    w.u64(64 << 20);
    w.u32(1);
    w.u64(0);
    w.u64(32 << 20);
    let e = VmSnapshot::decode(&codec::seal(&w.buf)).err().unwrap();
    assert!(matches!(e, SnapshotError::Corrupt(_)), "{e}");
    let good = s.encode();
    let mut payload = good[HEADER_LEN..].to_vec();
    // The last device's kind byte, just before its state (which the
    // disks' count, 4 bytes, follows).
    let last = crate::persist::to_bytes(&s.machine.devices.nets[1]).len();
    let kind = payload.len() - 4 - last - 1;
    assert_eq!(payload[kind], 2, "a net card's kind");
    payload[kind] = 9;
    let e = VmSnapshot::decode(&codec::seal(&payload)).err().unwrap();
    assert!(e.to_string().contains("unknown device kind 9"), "{e}");
}

#[test]
fn dirty_pages_accumulate_and_clear() {
    let mut d = DirtyPages::default();
    d.note(&[3, 200, 64]);
    d.note(&[3, 1]);
    assert_eq!(d.take(), vec![1, 3, 64, 200]);
    assert!(d.take().is_empty());
}

/// A snapshot with a disk: its device state in the machine, its overlays
/// and image identity after it.
fn disk_sample() -> VmSnapshot {
    use crate::devices::virtio::block::overlay::{Granule, LevelMap, GRANULE};
    use crate::devices::virtio::block::{BaseIdentity, BlockState, OverlaySnapshot};
    let mut s = sample();
    let transport = s.machine.devices.nets[0].transport.clone();
    s.machine.devices.blocks.push(BlockState {
        transport,
        capacity: 2048,
        read_only: false,
        id: *b"spvm0123456789abcdef",
    });
    let mut level = LevelMap::new();
    level.insert(3, Granule::Data(vec![0xab; GRANULE as usize].into()));
    level.insert(9, Granule::Zero);
    s.disks.push(super::disks::DiskSnapshot {
        path: "/images/a disk.img".into(),
        private: true,
        overlays: OverlaySnapshot {
            base: BaseIdentity {
                size: 1 << 20,
                mtime_sec: 1_700_000_000,
                mtime_nsec: 5,
                ino: 77,
                sample_hash: 0xfeed,
            },
            levels: vec![level],
        },
    });
    s
}

#[test]
fn disks_round_trip_and_must_match_the_devices() {
    let s = disk_sample();
    let d = VmSnapshot::decode(&s.encode()).unwrap();
    assert_eq!(d.disks, s.disks);
    assert_eq!(d.machine.devices.blocks, s.machine.devices.blocks);

    // Overlays without their device, and a device without its overlays.
    let mut t = disk_sample();
    t.machine.devices.blocks.clear();
    let e = VmSnapshot::decode(&t.encode())
        .err()
        .expect("overlays alone");
    assert!(
        e.to_string()
            .contains("1 disks' overlays for 0 virtio-blk devices"),
        "{e}"
    );
    let mut t = disk_sample();
    t.disks.clear();
    let e = VmSnapshot::decode(&t.encode()).err().expect("device alone");
    assert!(
        e.to_string().contains("0 disks' overlays for 1 virtio-blk"),
        "{e}"
    );
}

#[test]
fn a_version_3_state_still_names_its_layers() {
    // A version 3 file: this version's frame and payload prefix.
    let s = sample();
    let mut b = s.encode();
    b[8..12].copy_from_slice(&3u32.to_le_bytes());
    let payload = b[codec::HEADER_LEN..].to_vec();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&b[8..24]);
    h.update(&payload);
    b[24..32].copy_from_slice(&h.digest().to_le_bytes());
    let ids: Vec<u64> = s.layers.iter().map(|l| l.id).collect();
    assert_eq!(codec::manifest_layers(&b), Some(ids));
    // Damaged, it names nothing.
    let last = b.len() - 1;
    b[last] ^= 1;
    assert_eq!(codec::manifest_layers(&b), None);
}
