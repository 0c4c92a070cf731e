//! What both command lines share.

/// Makes a closed standard output (`turnout events | head -1`) end the
/// command quietly, as it ends other Unix tools, instead of with a panic:
/// `print!` panics on EPIPE, since Rust ignores SIGPIPE. The exit status is
/// 141, the shell's status for a command ended by SIGPIPE.
pub fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}
