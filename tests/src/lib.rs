//! Muster's integration tests live in integration/.
