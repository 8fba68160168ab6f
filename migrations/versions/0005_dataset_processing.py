"""dataset processing by a worker: attempts and the time its message was last sent (for the reconciler)

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(), nullable=True))
        batch_op.create_index('ix_datasets_status_enqueued', ['status', 'enqueued_at'], unique=False)


def downgrade():
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index('ix_datasets_status_enqueued')
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('attempts')
