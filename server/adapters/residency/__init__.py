"""Which adapters are resident where: the loaded-adapter cache and the manager that fills slots from it."""
