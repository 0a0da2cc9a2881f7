//! The global descriptor table and the KVM segment registers built from it.

use kvm_bindings::kvm_segment;

/// A segment as KVM describes it, built from its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes, or in 4 KiB units when `g` is set.
    pub limit: u32,
    /// Descriptor type (the 4-bit type field).
    pub type_: u8,
    /// Code/data (1) or system (0) descriptor.
    pub s: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// 64-bit code segment.
    pub l: u8,
    /// Default operand size 32-bit.
    pub db: u8,
    /// Granularity: limit in 4 KiB units.
    pub g: u8,
}

impl Segment {
    /// Encodes the segment as an 8-byte GDT descriptor (present).
    pub fn descriptor(&self) -> u64 {
        let base = self.base & 0xffff_ffff;
        let limit = u64::from(self.limit);
        let access = 0x80 // present
            | (u64::from(self.dpl & 3) << 5)
            | (u64::from(self.s & 1) << 4)
            | u64::from(self.type_ & 0xf);
        let flags = (u64::from(self.g & 1) << 3)
            | (u64::from(self.db & 1) << 2)
            | (u64::from(self.l & 1) << 1);
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (access << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (flags << 52)
            | ((base >> 24) << 56)
    }

    /// The KVM segment register for this segment, loaded with `selector`.
    pub fn kvm(&self, selector: u16) -> kvm_segment {
        let limit = if self.g == 1 {
            (self.limit << 12) | 0xfff
        } else {
            self.limit
        };
        kvm_segment {
            base: self.base,
            limit,
            selector,
            type_: self.type_,
            present: 1,
            dpl: self.dpl,
            db: self.db,
            s: self.s,
            l: self.l,
            g: self.g,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// Selector of the kernel 64-bit code segment.
pub const KERNEL_CS: u16 = 0x08;
/// Selector of the kernel data segment.
pub const KERNEL_DS: u16 = 0x10;
/// Selector of the user data segment (RPL 3).
pub const USER_DS: u16 = 0x18 | 3;
/// Selector of the user 64-bit code segment (RPL 3).
pub const USER_CS: u16 = 0x20 | 3;
/// Selector of the TSS (a 16-byte system descriptor).
pub const TSS_SEL: u16 = 0x28;

/// The flat segments of the boot GDT, in selector order (null first).
pub fn flat_segments() -> [Segment; 5] {
    let flat = |type_, dpl, l, db| Segment {
        base: 0,
        limit: 0xfffff,
        type_,
        s: 1,
        dpl,
        l,
        db,
        g: 1,
    };
    [
        Segment {
            base: 0,
            limit: 0,
            type_: 0,
            s: 0,
            dpl: 0,
            l: 0,
            db: 0,
            g: 0,
        },
        flat(0xb, 0, 1, 0), // kernel code: execute/read, accessed, 64-bit
        flat(0x3, 0, 0, 1), // kernel data: read/write, accessed
        flat(0x3, 3, 0, 1), // user data
        flat(0xb, 3, 1, 0), // user code, 64-bit
    ]
}

/// The 64-bit TSS segment (type 0xb: busy, as VM entry requires of TR).
pub fn tss_segment(base: u64, limit: u32) -> Segment {
    Segment {
        base,
        limit,
        type_: 0xb,
        s: 0,
        dpl: 0,
        l: 0,
        db: 0,
        g: 0,
    }
}

/// The GDT as 64-bit words: the flat segments, then the two words of the
/// 16-byte TSS descriptor.
pub fn gdt_words(tss_base: u64, tss_limit: u32) -> Vec<u64> {
    let mut words: Vec<u64> = flat_segments().iter().map(Segment::descriptor).collect();
    words[0] = 0;
    words.push(tss_segment(tss_base, tss_limit).descriptor());
    words.push(tss_base >> 32);
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_descriptors() {
        let s = flat_segments();
        // The classic 64-bit kernel code descriptor.
        assert_eq!(s[1].descriptor(), 0x00af_9b00_0000_ffff);
        assert_eq!(s[2].descriptor(), 0x00cf_9300_0000_ffff);
        assert_eq!(s[4].descriptor(), 0x00af_fb00_0000_ffff);
        let cs = s[4].kvm(USER_CS);
        assert_eq!(
            (cs.dpl, cs.l, cs.limit, cs.selector),
            (3, 1, 0xffff_ffff, 0x23)
        );
    }

    #[test]
    fn tss_descriptor_splits_base() {
        let w = gdt_words(0x1234_5678_9abc, 0x67);
        assert_eq!(w.len(), 7);
        assert_eq!(w[6], 0x1234);
        assert_eq!((w[5] >> 16) & 0xff_ffff, 0x78_9abc);
        assert_eq!(w[5] >> 56, 0x56);
    }
}
