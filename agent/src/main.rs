fn main() -> std::process::ExitCode {
    boomerang_agent::cli::main()
}
