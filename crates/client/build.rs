//! Generates the client from the checked-in OpenAPI document. Generated in a
//! build script (rather than a macro) so the output can be read at
//! `target/*/build/stratus-client-*/out/codegen.rs`.

fn main() {
    let src = "../../openapi/stratus.json";
    println!("cargo:rerun-if-changed={src}");
    let file = std::fs::File::open(src).expect("openapi/stratus.json must exist");
    let spec: openapiv3::OpenAPI =
        serde_json::from_reader(file).expect("openapi/stratus.json must be valid OpenAPI 3.0");
    let mut settings = progenitor::GenerationSettings::default();
    settings.with_interface(progenitor::InterfaceStyle::Builder);
    let mut generator = progenitor::Generator::new(&settings);
    let tokens = generator.generate_tokens(&spec).expect("client generation");
    let ast = syn::parse2(tokens).expect("generated code parses");
    let content = prettyplease::unparse(&ast);
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("codegen.rs");
    std::fs::write(out, content).expect("writing codegen.rs");
}
