"""slitterd: the daemon that owns a slitter instance.

Data flows one way.  ``server`` receives and validates requests (the schema
is ``slitter.protocol``) and dispatches them to ``handlers``; handlers move
objects between the per-class ``depot`` and client ``rack``s, ask the
``mill`` for new runs of spans carved from the ``arena``, and read figures
for ``stats``.  The arena's segments are the only state that outlives the
process.
"""
