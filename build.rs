//! Generates the Rust code for proto/kvstore.proto with protobuf-codegen's
//! pure-Rust parser (no `protoc` needed).

fn main() {
    println!("cargo:rerun-if-changed=proto/kvstore.proto");
    println!("cargo:rerun-if-changed=build.rs");
    protobuf_codegen::Codegen::new()
        .pure()
        .include("proto")
        .input("proto/kvstore.proto")
        .cargo_out_dir("proto")
        .run_from_script();
}
