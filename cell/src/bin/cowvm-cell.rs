//! A cell process on its own (the supervisor normally starts `cowvm cell`; tests start this).

fn main() -> std::process::ExitCode {
    cowvm_cell::worker::main()
}
