fn main() -> std::process::ExitCode {
    boomerang_mt::cli::main()
}
