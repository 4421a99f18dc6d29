"""Drop-in modules that take the place of a platform's qemu-img wrapper, built on library calls (issue 11)."""
