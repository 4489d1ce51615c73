"""What every part uses: the exception tree, units, files written atomically."""
