"""Models: frozen slice encoders, the Slicing-SAM3D student, promptable teachers, registry."""
