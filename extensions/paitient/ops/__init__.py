"""Zone ``paitient.ops``: running the workspace, apart from the product.

``paitient up``/``status``/``stop`` (:mod:`.up`), the embedded demo directory (:mod:`.directory`, a
private slapd on loopback), the demo people (:mod:`.demo`) and demo data (:mod:`.demodata`).
Process: the operator's ``paitient up``. User: root. Nothing in the product imports this zone.
"""
