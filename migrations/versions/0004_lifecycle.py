"""lifecycle: admin API keys and revocation time; datasets processed by a worker (status, error)

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('admin', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('revoked_at', sa.DateTime(), nullable=True))
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.String(length=16), nullable=False, server_default='ready'))
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('error')
        batch_op.drop_column('status')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('revoked_at')
        batch_op.drop_column('admin')
