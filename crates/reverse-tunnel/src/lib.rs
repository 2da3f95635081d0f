//! bulwark-tunnel: reverse tunnel library (relay side, device side) and operator CLI.
//!
//! Not built yet: see the reverse-tunnel issue. The crate exists so the workspace has the
//! layout described in DESIGN.md; it deliberately exports nothing.
