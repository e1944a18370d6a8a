//! The main crate's fuzz targets (tests/fuzz.rs), built here for
//! coverage-guided engines: `cargo bolero test targets::NAME`.

#[path = "../../tests/fuzz.rs"]
mod targets;
