fn main() -> std::process::ExitCode {
    boomerang_ps::cli::main()
}
