"""LightX2V configs in lightq: ``from_lightx2v=config.json`` on the command line.

- ``keys``     what lightq does with each LightX2V key it does not map: missing features (refused, the one table
               to switch a feature on), kernel choices (recorded, with how the numerics differ), constants,
               placement and unused keys
- ``importer`` one JSON config -> lightq settings with LightX2V's meaning (``import_config``)
- ``cli``      the command line: each config an option of the ``lightx2v`` config group (``expand``)
"""
