"""Code shared by several loraplex deployables: settings, ids, object storage, logging, datasets.

Nothing here may import the API, the gateway, the workers or the database models.
"""
