"""The admin dashboard (`/admin`): server-rendered pages for operators and tenant admins."""
