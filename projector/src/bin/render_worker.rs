//! A render worker on its own, for the projector's tests and for library users who run a
//! [`sesame_projector::sandbox::RenderPool`] without the `sesame` binary (which has the
//! same thing as its hidden `render-worker` subcommand).

fn main() -> std::process::ExitCode {
    sesame_projector::sandbox::worker_main()
}
