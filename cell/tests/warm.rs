//! Warm shells kept in cells and each cell's own mapping budget, on the real /dev/kvm.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use cowvm_cell::protocol::RemoteErrorKind;
use cowvm_cell::{CellPool, PoolError};

/// Waits until the cells report `shells` ready shells of template 1.
fn wait_ready(pool: &CellPool, shells: u32) -> u32 {
    let started = Instant::now();
    loop {
        pool.refresh_warm();
        let ready = pool.warm_ready(1);
        if ready >= shells || started.elapsed() > Duration::from_secs(60) {
            return ready;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn test_warm_shells_are_kept_in_cells_taken_by_spawns_and_not_rebuilt_unasked() {
    let template = template();
    let pool = pool(4, 3, &template);
    // 6 shells at 4 per cell: the pool starts two cells for them.
    assert_eq!(pool.grow_warm(1, 6, true).expect("grow"), 6);
    assert_eq!(pool.warm_target(1), 6);
    assert_eq!(pool.cells().len(), 2);
    assert_eq!(
        wait_ready(&pool, 6),
        6,
        "the cells build their shells in the background"
    );
    let listed = pool.cells();
    assert_eq!(listed.iter().map(|c| c.warm_shells).sum::<u32>(), 6, "{listed:?}");
    assert_eq!(listed.iter().map(|c| c.vms).sum::<u32>(), 0, "shells are not VMs");

    // A spawn goes to the cells with shells and takes them.
    let batch = pool.spawn(1, 5).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    assert!(
        batch.clones.iter().all(|c| c.spawned.pooled),
        "every clone came from a warm shell: {:?}",
        batch.clones
    );
    assert_eq!(pool.cells().len(), 2, "no cell started for clones that had shells");
    // The shells taken are not rebuilt unless asked: the targets dropped by them.
    assert_eq!(pool.warm_target(1), 1);
    pool.refresh_warm();
    assert_eq!(pool.warm_target(1), 1, "the cells say the same");

    // Targets grow only into room nobody holds: 3 of 8 places are left in the two cells.
    assert_eq!(pool.grow_warm(1, 10, false).expect("grow"), 2);
    assert_eq!(pool.warm_target(1), 3);
    // With a third cell allowed, it takes 4 more.
    assert_eq!(pool.grow_warm(1, 10, true).expect("grow"), 4);
    assert_eq!(pool.warm_target(1), 7);
    assert_eq!(pool.shrink_warm(Some(1), 100), 7);
    assert_eq!(pool.warm_target(1), 0);
    pool.refresh_warm();
    assert_eq!(pool.warm_ready(1), 0, "the cells tore their shells down");
}

#[test]
fn test_a_clone_takes_room_from_another_templates_shells_in_its_cell() {
    let template = template();
    // A second template: a fresh boot of the same guest (a memfd of its own).
    let other = common::template();
    let pool = pool(4, 1, &template);
    pool.add_template(2, Arc::clone(&other));
    assert_eq!(pool.grow_warm(2, 4, true).expect("grow"), 4);
    // The only cell is full of template 2's shells; clones of template 1 still fit, and the
    // shells give way.
    let batch = pool.spawn(1, 3).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    assert_eq!(
        pool.warm_target(2),
        1,
        "shells of template 2 gave their room to the clones"
    );
    pool.refresh_warm();
    assert_eq!(pool.warm_target(2), 1);
    assert!(pool.warm_ready(2) <= 1);
}

#[test]
fn test_a_cell_is_never_promised_more_vms_than_its_own_mapping_budget() {
    let template = template();
    let each = cowvm_vmm::pool::mappings_per_clone(&template);
    // Room for 10 VMs per cell by count, but for only 3 by each cell's mapping budget.
    let mut config = config(10);
    config.mapping_budget = Some(3 * each as u64 + each as u64 / 2);
    let pool = CellPool::new(config, 3).expect("pool");
    pool.add_template(1, Arc::clone(&template));
    let batch = pool.spawn(1, 7).expect("spawn");
    assert!(batch.failed.is_empty(), "{:?}", batch.failed);
    let cells = pool.cells();
    assert_eq!(cells.len(), 3, "7 VMs at 3 per cell's budget: {cells:?}");
    for cell in &cells {
        assert!(cell.vms <= 3, "{cell:?}");
        assert!(cell.mappings <= pool.mapping_budget(), "{cell:?}");
    }
    // 2 places left over all cells: 3 more do not fit, 2 do.
    assert!(matches!(pool.spawn(1, 3), Err(PoolError::Full { .. })));
    assert_eq!(pool.spawn(1, 2).expect("spawn").clones.len(), 2);

    // The cell enforces its budget itself, whatever its supervisor asks.
    let full = pool.cell(cells[0].id).expect("cell");
    let refused = full.spawn(1, 1).expect_err("over the cell's own budget");
    assert_eq!(refused.remote_kind(), Some(RemoteErrorKind::Full), "{refused}");

    // A template whose one VM exceeds a cell's budget is refused before any cell is asked.
    let mut tiny = common::config(10);
    tiny.mapping_budget = Some(each as u64 - 1);
    let pool = CellPool::new(tiny, 1).expect("pool");
    pool.add_template(1, Arc::clone(&template));
    assert!(matches!(pool.spawn(1, 1), Err(PoolError::TooFragmented { .. })));
    assert!(pool.cells().is_empty(), "no cell was started");
}
