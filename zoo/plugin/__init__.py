"""The plugin boundary, the bottom floor of the house: imports nothing above it (only zoo.errors
and zoo.records).

  hookspecs  the hooks a plugin implements (pluggy project "zoo")
  api        what plugins register (BackboneProvider, Exporter) and exchange with the zoo
  host       pluggy discovery and per-plugin isolation
  registry   the registries the hooks fill, and the catalogue they share with zoo.index
  reference  the plugin reference generated from api/hookspecs/records

Nothing is imported here: `import zoo.plugin.api` stays as light as the module it names.
"""
