//! Builds the appliance ISO without the admin CLI: `cargo run -p failback-iso --example
//! build_appliance -- CLIENT OUT [KERNEL_ARG...]` (inputs from the default cache).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let client = args
        .next()
        .ok_or("usage: build_appliance CLIENT OUT [KERNEL_ARG...]")?;
    let out = args
        .next()
        .ok_or("usage: build_appliance CLIENT OUT [KERNEL_ARG...]")?;
    let inputs = failback_iso::inputs::Inputs::from_cache(&failback_iso::inputs::default_cache())?;
    let report = failback_iso::appliance::build(
        &failback_iso::appliance::ApplianceOptions {
            inputs,
            client: client.into(),
            extra_kernel_args: args.collect::<Vec<_>>().join(" "),
        },
        std::path::Path::new(&out),
    )?;
    println!("{out}: {report:#?}");
    Ok(())
}
