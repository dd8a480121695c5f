//! GDT descriptors and the matching `kvm_segment`s. Every descriptor has its Accessed bit set (the
//! TSS is marked busy), so the CPU never writes the GDT when a segment is loaded.

use kvm_bindings::kvm_segment;

/// 64-bit code: present, DPL 0, execute/read, accessed; L=1, G=1.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Data: present, DPL 0, read/write, accessed; D/B=1, G=1.
pub const DATA_FLAGS: u16 = 0xc093;
/// 64-bit TSS, busy; G=1.
pub const TSS_FLAGS: u16 = 0x808b;

/// Builds an 8-byte descriptor from the access/flags word, base and 20-bit limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The `kvm_segment` KVM should load for descriptor `entry` at GDT `selector`.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if granularity == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_code_descriptor_decodes_to_a_long_mode_accessed_segment() {
        let seg = segment(descriptor(CODE64_FLAGS, 0, 0xfffff), 0x08);
        assert_eq!((seg.l, seg.db, seg.present, seg.s, seg.g), (1, 0, 1, 1, 1));
        assert_eq!(seg.type_, 0xb, "execute/read with the Accessed bit set");
        assert_eq!(seg.limit, 0xffff_ffff);
    }

    #[test]
    fn test_descriptor_round_trips_base_and_limit() {
        let seg = segment(descriptor(TSS_FLAGS, 0x1234_5678, 0x67), 0x18);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.type_, 0xb, "busy 64-bit TSS");
        assert_eq!(seg.s, 0);
    }
}
