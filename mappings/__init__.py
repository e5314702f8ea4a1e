"""Pure record <-> FHIR R4 mappings, one module per target resource.

Nothing here touches a database, an HTTP client or the settings: everything a mapping needs comes
in as arguments.
"""
