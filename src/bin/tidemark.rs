//! `tidemark`: the runtime CLI.

fn main() {}
