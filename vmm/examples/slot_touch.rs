//! A guest write to every page of 64 MiB of a fresh 4 GiB clone, lazy and eager slots
//! alternating, with KVM's vCPU exit counters: where a lazy clone's extra time goes.
use std::time::Instant;

use cowvm_vmm::slots::SlotPolicy;
use cowvm_vmm::{GuestCommand, Kvm, Template, Vm, VmConfig};
use vm_memory::GuestAddress;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Kvm::open()?;
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(4096))?;
    let template = Template::freeze(&kvm, &mut vm)?;
    let work = GuestCommand::Write {
        start: GuestAddress(1 << 30),
        count: (64 << 20) / 4096,
        stride: 4096,
        value: 1,
    };
    for _ in 0..4 {
        for policy in [SlotPolicy::Lazy, SlotPolicy::Eager] {
            let mut clone = Vm::restore_with(&kvm, template.memory(), template.state(), policy)?;
            let started = Instant::now();
            clone.execute(work, None)?;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let stats = clone.kvm_stats()?;
            let vcpu = &stats.vcpus[0];
            let get = |k: &str| vcpu.get(k).and_then(|s| s.value.scalar()).unwrap_or(0);
            let vm_stat = |k: &str| stats.vm.get(k).and_then(|s| s.value.scalar()).unwrap_or(0);
            println!(
                "{policy:?}: {ms:.1} ms, slots {}, exits {}, pf_taken {}, pf_fixed {}, mmio_exits {}, insn_emulation {}, mmu_shadow_zapped {}, mmu_pte_write {}",
                clone.slot_stats().slots,
                get("exits"),
                get("pf_taken"),
                get("pf_fixed"),
                get("mmio_exits"),
                get("insn_emulation"),
                vm_stat("mmu_shadow_zapped"),
                vm_stat("mmu_pte_write"),
            );
        }
    }
    Ok(())
}
