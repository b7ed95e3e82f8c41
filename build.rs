//! Generates the Rust code for proto/kvstore.proto with protobuf-codegen's
//! pure-Rust parser (no `protoc` needed): the messages into
//! `$OUT_DIR/proto/`, and from each `service` block the RPC glue into
//! `$OUT_DIR/services.rs` (ids, a server trait, a dispatcher, a client stub
//! and a `Router` that serves every service). Adding a method to the proto
//! therefore needs no hand edits anywhere in the crate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const PROTO_DIR: &str = "proto";
const PROTO_FILE: &str = "proto/kvstore.proto";

fn main() {
    println!("cargo:rerun-if-changed={PROTO_FILE}");
    println!("cargo:rerun-if-changed=build.rs");
    protobuf_codegen::Codegen::new()
        .pure()
        .include(PROTO_DIR)
        .input(PROTO_FILE)
        .cargo_out_dir("proto")
        .run_from_script();

    let services = parse_services();
    let code = generate(&services);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let path = out_dir.join("services.rs");
    std::fs::write(&path, code).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// One `service` block of the proto, with names already mapped to Rust.
struct Service {
    /// `package.Service`, e.g. `kvstore.KVStore`: the name in logs and errors.
    full_name: String,
    /// snake_case, e.g. `kv_store`: the id module and `Router::with_kv_store`.
    snake: String,
    /// CamelCase, e.g. `KvStore`: `KvStoreService`, `KvStoreStub`.
    camel: String,
    methods: Vec<Method>,
}

struct Method {
    proto_name: String,
    /// snake_case: the trait and stub method name.
    snake: String,
    /// Rust paths of the request and reply messages, from the crate root.
    request: String,
    reply: String,
}

/// Reads every service of the proto file; exits the build with a message
/// naming the problem when the file cannot be parsed or uses streaming.
fn parse_services() -> Vec<Service> {
    let set = protobuf_parse::Parser::new()
        .pure()
        .include(PROTO_DIR)
        .input(PROTO_FILE)
        .file_descriptor_set()
        .unwrap_or_else(|e| panic!("cannot parse {PROTO_FILE}: {e:#}"));
    // Map every message's fully-qualified proto name to its Rust path, so
    // a method may use a message declared in any parsed file.
    let mut message_paths: Vec<(String, String)> = Vec::new();
    for file in &set.file {
        let module = rust_module_of_file(file.name());
        let package = file.package();
        for message in &file.message_type {
            let proto = if package.is_empty() {
                format!(".{}", message.name())
            } else {
                format!(".{package}.{}", message.name())
            };
            let rust = format!("crate::proto::{module}::{}", message.name());
            message_paths.push((proto, rust));
        }
    }
    let resolve = |proto_type: &str, service: &str, method: &str| -> String {
        message_paths
            .iter()
            .find(|(proto, _)| proto == proto_type)
            .map(|(_, rust)| rust.clone())
            .unwrap_or_else(|| {
                panic!(
                    "{PROTO_FILE}: {service}.{method} uses {proto_type}, which is not a \
                     top-level message (nested messages are not supported as RPC types)"
                )
            })
    };

    let mut services = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let proto_name = service.name().to_string();
            let full_name = if file.package().is_empty() {
                proto_name.clone()
            } else {
                format!("{}.{proto_name}", file.package())
            };
            let mut methods = Vec::new();
            for method in &service.method {
                if method.client_streaming() || method.server_streaming() {
                    panic!(
                        "{PROTO_FILE}: {full_name}.{} streams; only unary RPCs are supported",
                        method.name()
                    );
                }
                methods.push(Method {
                    proto_name: method.name().to_string(),
                    snake: snake_case(method.name()),
                    request: resolve(method.input_type(), &full_name, method.name()),
                    reply: resolve(method.output_type(), &full_name, method.name()),
                });
            }
            services.push(Service {
                snake: snake_case(&proto_name),
                camel: camel_case(&snake_case(&proto_name)),
                full_name,
                methods,
            });
        }
    }
    services
}

/// protobuf-codegen names a file's module after the file stem, with
/// characters that cannot appear in an identifier replaced by `_`.
fn rust_module_of_file(file_name: &str) -> String {
    let stem = Path::new(file_name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(file_name);
    stem.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// `KVStore` -> `kv_store`, `AppendEntries` -> `append_entries`.
fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            let previous = chars[i - 1];
            let next_is_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            let word_starts = previous.is_ascii_lowercase()
                || previous.is_ascii_digit()
                || (previous.is_ascii_uppercase() && next_is_lower);
            if word_starts && !out.ends_with('_') {
                out.push('_');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// `kv_store` -> `KvStore`.
fn camel_case(snake: &str) -> String {
    snake
        .split('_')
        .filter(|word| !word.is_empty())
        .map(|word| {
            let mut chars = word.chars();
            let first = chars.next().map(|c| c.to_ascii_uppercase());
            first.into_iter().chain(chars).collect::<String>()
        })
        .collect()
}

fn generate(services: &[Service]) -> String {
    let mut out = String::new();
    out.push_str(
        "// @generated by build.rs from proto/kvstore.proto: one id module, server\n\
         // trait, dispatcher and client stub per service, and the Router.\n\n",
    );
    for (service_index, service) in services.iter().enumerate() {
        generate_ids(&mut out, service, service_index as u32 + 1);
        generate_trait(&mut out, service);
        generate_dispatcher(&mut out, service);
        generate_stub(&mut out, service);
    }
    generate_router(&mut out, services);
    out
}

fn generate_ids(out: &mut String, service: &Service, service_id: u32) {
    let s = &service;
    let _ = writeln!(
        out,
        "/// Wire ids of the `{full}` service and its methods.\n\
         pub mod {snake} {{\n    \
             /// The id of `{full}` in every frame's header.\n    \
             pub const SERVICE_ID: u32 = {service_id};\n    \
             /// The service's fully-qualified proto name.\n    \
             pub const SERVICE_NAME: &str = \"{full}\";",
        full = s.full_name,
        snake = s.snake,
    );
    for (method_index, method) in s.methods.iter().enumerate() {
        let _ = writeln!(
            out,
            "    /// Method id of `{full}.{name}`.\n    pub const {upper}: u32 = {id};",
            full = s.full_name,
            name = method.proto_name,
            upper = method.snake.to_ascii_uppercase(),
            id = method_index + 1,
        );
    }
    let names: Vec<String> = s
        .methods
        .iter()
        .map(|m| format!("\"{}\"", m.proto_name))
        .collect();
    let _ = writeln!(
        out,
        "    /// Method names in id order: the name of method id `n` is at `n - 1`.\n    \
         pub const METHOD_NAMES: &[&str] = &[{}];\n\n    \
         /// The proto name of `method_id`, or `None` when the service has no such method.\n    \
         pub fn method_name(method_id: u32) -> Option<&'static str> {{\n        \
             let index = usize::try_from(method_id).ok()?.checked_sub(1)?;\n        \
             METHOD_NAMES.get(index).copied()\n    \
         }}\n}}\n",
        names.join(", ")
    );
}

fn generate_trait(out: &mut String, service: &Service) {
    let _ = writeln!(
        out,
        "/// Server side of `{full}`. Each handler answers through its\n\
         /// [`Responder`](crate::rpc::Responder): at once (a blocking handler calls\n\
         /// `responder.send(reply)` before returning) or later from another thread,\n\
         /// while the connection goes on reading the next pipelined request. A\n\
         /// responder dropped without an answer replies with an error frame.\n\
         pub trait {camel}Service: Send + Sync + 'static {{",
        full = service.full_name,
        camel = service.camel,
    );
    for method in &service.methods {
        let _ = writeln!(
            out,
            "    /// `{full}.{name}`.\n    \
             fn {snake}(&self, request: {req}, responder: crate::rpc::Responder<{rep}>);",
            full = service.full_name,
            name = method.proto_name,
            snake = method.snake,
            req = method.request,
            rep = method.reply,
        );
    }
    out.push_str("}\n\n");
}

fn generate_dispatcher(out: &mut String, service: &Service) {
    let _ = writeln!(
        out,
        "/// Decodes a `{full}` request for `method_id` and hands it to the matching\n\
         /// handler. An unknown method or undecodable request is answered with an\n\
         /// error frame through `responder`; nothing here panics on network input.\n\
         pub fn dispatch_{snake}(\n    \
             service: &dyn {camel}Service,\n    \
             method_id: u32,\n    \
             request: &[u8],\n    \
             responder: crate::rpc::RawResponder,\n\
         ) {{\n    \
             match method_id {{",
        full = service.full_name,
        snake = service.snake,
        camel = service.camel,
    );
    for method in &service.methods {
        let _ = writeln!(
            out,
            "        {module}::{upper} => crate::rpc::decode_and_call::<{req}, {rep}>(\n            \
                 request,\n            \
                 responder,\n            \
                 |request, responder| service.{snake}(request, responder),\n        \
             ),",
            module = service.snake,
            upper = method.snake.to_ascii_uppercase(),
            req = method.request,
            rep = method.reply,
            snake = method.snake,
        );
    }
    let _ = writeln!(
        out,
        "        _ => responder.send_error(\n            \
                 crate::rpc::RpcCode::UnknownMethod,\n            \
                 &format!(\"service {full} has no method with id {{method_id}}\"),\n        \
             ),\n    \
         }}\n}}\n",
        full = service.full_name,
    );
}

fn generate_stub(out: &mut String, service: &Service) {
    let _ = writeln!(
        out,
        "/// Client side of `{full}`: one blocking method per RPC over any\n\
         /// [`RpcChannel`](crate::rpc::RpcChannel).\n\
         #[derive(Debug, Clone)]\n\
         pub struct {camel}Stub<C: crate::rpc::RpcChannel> {{\n    \
             channel: C,\n\
         }}\n\n\
         impl<C: crate::rpc::RpcChannel> {camel}Stub<C> {{\n    \
             /// A stub that sends every call through `channel`.\n    \
             pub fn new(channel: C) -> Self {{\n        \
                 Self {{ channel }}\n    \
             }}\n\n    \
             /// The channel the calls go through.\n    \
             pub fn channel(&self) -> &C {{\n        \
                 &self.channel\n    \
             }}\n\n    \
             /// Gives the channel back.\n    \
             pub fn into_channel(self) -> C {{\n        \
                 self.channel\n    \
             }}",
        full = service.full_name,
        camel = service.camel,
    );
    for method in &service.methods {
        let _ = writeln!(
            out,
            "\n    /// Calls `{full}.{name}` and waits for its reply.\n    \
             pub fn {snake}(&self, request: &{req}) -> Result<{rep}, crate::rpc::RpcError> {{\n        \
                 crate::rpc::call_unary(&self.channel, {module}::SERVICE_ID, {module}::{upper}, request)\n    \
             }}",
            full = service.full_name,
            name = method.proto_name,
            snake = method.snake,
            req = method.request,
            rep = method.reply,
            module = service.snake,
            upper = method.snake.to_ascii_uppercase(),
        );
    }
    out.push_str("}\n\n");
}

fn generate_router(out: &mut String, services: &[Service]) {
    out.push_str(
        "/// Routes each request frame to the service registered for its service id.\n\
         /// A service that is not registered answers with an `UnknownService` error.\n\
         #[derive(Clone, Default)]\n\
         pub struct Router {\n",
    );
    for service in services {
        let _ = writeln!(
            out,
            "    {snake}: Option<std::sync::Arc<dyn {camel}Service>>,",
            snake = service.snake,
            camel = service.camel,
        );
    }
    out.push_str(
        "}\n\n\
         impl Router {\n    \
             /// A router that serves no service yet.\n    \
             pub fn new() -> Self {\n        \
                 Self::default()\n    \
             }\n",
    );
    for service in services {
        let _ = writeln!(
            out,
            "\n    /// Serves `{full}` with `service`, replacing any earlier registration.\n    \
             pub fn with_{snake}(mut self, service: std::sync::Arc<dyn {camel}Service>) -> Self {{\n        \
                 self.{snake} = Some(service);\n        \
                 self\n    \
             }}",
            full = service.full_name,
            snake = service.snake,
            camel = service.camel,
        );
    }
    out.push_str(
        "\n    /// Hands one request to its service's dispatcher. Every path answers\n    \
         /// through `responder` exactly once (an error frame when nothing serves it).\n    \
         pub fn dispatch(\n        \
             &self,\n        \
             service_id: u32,\n        \
             method_id: u32,\n        \
             request: &[u8],\n        \
             responder: crate::rpc::RawResponder,\n    \
         ) {\n        \
             match service_id {\n",
    );
    for service in services {
        let _ = writeln!(
            out,
            "            {snake}::SERVICE_ID => match &self.{snake} {{\n                \
                 Some(service) => dispatch_{snake}(service.as_ref(), method_id, request, responder),\n                \
                 None => responder.send_error(\n                    \
                     crate::rpc::RpcCode::UnknownService,\n                    \
                     \"service {full} is not served on this port\",\n                \
                 ),\n            \
             }},",
            snake = service.snake,
            full = service.full_name,
        );
    }
    out.push_str(
        "            _ => responder.send_error(\n                \
                 crate::rpc::RpcCode::UnknownService,\n                \
                 &format!(\"no service has id {service_id}\"),\n            \
             ),\n        \
         }\n    \
         }\n}\n\n",
    );
    out.push_str("/// `(service id, method id, \"package.Service/Method\")` for logs.\n");
    out.push_str("pub fn describe_method(service_id: u32, method_id: u32) -> Option<(&'static str, &'static str)> {\n    match service_id {\n");
    for service in services {
        let _ = writeln!(
            out,
            "        {snake}::SERVICE_ID => Some(({snake}::SERVICE_NAME, {snake}::method_name(method_id)?)),",
            snake = service.snake,
        );
    }
    out.push_str("        _ => None,\n    }\n}\n");
}
