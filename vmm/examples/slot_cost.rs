//! Restore time and slots of a clone with lazy and eager memory slots, at 256 MiB and 4 GiB, for
//! a template with one data page per MiB (as `cowvm bench` makes them).
use std::time::Instant;

use cowvm_vmm::slots::SlotPolicy;
use cowvm_vmm::{GuestCommand, Kvm, Template, Vm, VmConfig};
use vm_memory::GuestAddress;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Kvm::open()?;
    for mib in [256u64, 4096] {
        let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(mib))?;
        let write = GuestCommand::Write {
            start: GuestAddress((4 << 20) + 8192),
            count: mib - 4,
            stride: 1 << 20,
            value: 1,
        };
        vm.execute(write, None)?;
        let template = Template::freeze(&kvm, &mut vm)?;
        for policy in [SlotPolicy::Lazy, SlotPolicy::Eager, SlotPolicy::Lazy, SlotPolicy::Eager] {
            let mut times = Vec::new();
            let mut stats = None;
            for _ in 0..20 {
                let started = Instant::now();
                let clone = Vm::restore_with(&kvm, template.memory(), template.state(), policy)?;
                times.push(started.elapsed().as_secs_f64() * 1e6);
                stats = Some(clone.slot_stats());
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{mib} MiB {policy:?}: restore p50 {:.0} µs, {stats:?}",
                times[times.len() / 2]
            );
        }
    }
    Ok(())
}
