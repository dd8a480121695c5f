use cowvm_vmm::*;
use std::time::{Duration, Instant};
use vm_memory::GuestAddress;
fn main() {
    let kvm = Kvm::open().unwrap();
    let (mut vm, _) = Vm::boot(&kvm, &VmConfig::builtin(256)).unwrap();
    let (mem, state) = vm.freeze(&kvm).unwrap();
    let mut c = Vm::restore(&kvm, &mem, &state).unwrap();
    c.execute(
        GuestCommand::Checksum {
            start: GuestAddress(0),
            count: 16384,
            stride: 4096,
        },
        Some(Duration::from_secs(10)),
    )
    .unwrap();
    let pm = pagemap::PageMap::open().unwrap();
    let kp = kpage::KPages::open().unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        let runs = pm.present_runs(c.ram().host_address(), c.ram().size()).unwrap();
        let a = t.elapsed();
        let t = Instant::now();
        let mut pfns = vec![];
        for r in &runs {
            pfns.extend(
                pm.read(r.range.start, ((r.range.end - r.range.start) / 4096) as usize)
                    .unwrap()
                    .iter()
                    .filter_map(|e| e.pfn()),
            );
        }
        let b = t.elapsed();
        let t = Instant::now();
        pfns.sort_unstable();
        let c2 = t.elapsed();
        let t = Instant::now();
        let n = kp.counts(&pfns).unwrap().len();
        let d = t.elapsed();
        println!(
            "runs {} scan {:?} pagemap {:?} sort {:?} counts({n}) {:?}",
            runs.len(),
            a,
            b,
            c2,
            d
        );
    }
}
