//! bulwark-agent: the edge agent that runs on field gateways.
//!
//! Not built yet: see the edge-agent issue. The crate exists so the workspace has the
//! layout described in DESIGN.md; it deliberately exports nothing.
