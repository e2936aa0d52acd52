//! Sequences, sampling and generation.
