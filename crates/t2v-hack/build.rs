// Empty: the build dependencies in Cargo.toml unify the features of build scripts' and
// procedural macros' dependencies across build selections.
fn main() {}
